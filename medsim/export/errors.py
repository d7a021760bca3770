"""Errors of the export stage (all :class:`~medsim.errors.MedsimError`: the CLI prints one line and exits 2).

Kept free of torch/onnx imports so the CLI and tests can import them cheaply.
"""

from __future__ import annotations

from typing import Sequence

from medsim.errors import MedsimError

__all__ = ["ExportError", "ExportParityError", "TensorRTUnavailable", "TensorRTBuildError"]


class ExportError(MedsimError):
    """The run cannot be exported as asked (missing files, bad options, an exporter failure)."""


class ExportParityError(ExportError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance.

    Attributes:
        output: the output name (``embedding``, ``attention``, ``logits``).
        diff: the largest absolute difference measured.
        atol: the tolerance it exceeded.
        batch: the batch size that showed it.
    """

    def __init__(self, message: str, *, output: str, diff: float, atol: float, batch: int):
        super().__init__(message)
        self.output, self.diff, self.atol, self.batch = output, diff, atol, batch


class TensorRTUnavailable(ExportError):
    """TensorRT cannot run here: the ``tensorrt`` Python package or an NVIDIA GPU/driver is missing."""


class TensorRTBuildError(ExportError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


def check_choice(value: str | None, options: Sequence[str], what: str) -> str | None:
    """Return ``value`` if it is one of ``options`` (or None); else raise :class:`ExportError` with a
    "did you mean"."""
    import difflib

    if value is None or value in options:
        return value
    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.4)
    raise ExportError(f"unknown {what} '{value}'; choose {', '.join(options)}"
                      + (f" (did you mean '{close[0]}'?)" if close else ""))
