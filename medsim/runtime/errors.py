"""Errors of the torch-free runtime (all :class:`~medsim.errors.MedsimError`: the CLI prints one line and exits 2).

They are re-exported by :mod:`medsim.deploy` under the same names (``medsim.deploy.DeployError`` is this class),
so code that catches them keeps working whichever layer raised them.
"""

from __future__ import annotations

from medsim.errors import MedsimError

__all__ = ["DeployError", "BackendUnavailable", "UnsupportedPreprocessing"]


class DeployError(MedsimError):
    """An exported model or an input cannot be used for inference (names the file or value and why)."""


class BackendUnavailable(DeployError):
    """The inference backend asked for cannot run on this host (the message names what is missing)."""


class UnsupportedPreprocessing(DeployError, NotImplementedError):
    """The manifest describes preprocessing this NumPy reimplementation does not cover."""
