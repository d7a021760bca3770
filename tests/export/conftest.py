"""Fixtures shared by the export tests (the tiny run and its export are in tests/conftest.py)."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def no_tensorrt(monkeypatch):
    """This host, whatever it is: no tensorrt package and no GPU (so `--trt` fails the same way everywhere)."""
    import medsim.export.tensorrt as mod

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(mod, "gpu_available", lambda: (False, "no nvidia-smi on PATH"))
