"""Shared fixtures: the real-data folder (../shared/data, skipped when absent) and a small synthetic sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    """A fixed anonymisation salt, so tests never create .medsim-salt files in the working tree."""
    monkeypatch.setenv("MEDSIM_SALT", "test-salt")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set MEDSIM_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded sample with small parameters (shared by the session)."""
    from medsim.data.sample import make_sample

    root = tmp_path_factory.mktemp("sample")
    make_sample(root, seed=0, n_per_class=12, size=32, n_dicom=4, volume_shape=(24, 24, 16))
    return root


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared_data)
