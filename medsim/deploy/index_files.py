"""Files of a saved case index: the metadata file's name, checksums, faiss' binary reader, file names confined
to the index folder, and the temporary folder an index is written into before it is moved into place.

Shared by :mod:`medsim.deploy.index` and :mod:`medsim.deploy.index_scale`; standard library, numpy-free, faiss
imported lazily (no torch).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from medsim.runtime.errors import DeployError

__all__ = ["META_FILE", "CaseIndexError", "load_faiss", "sha256_file", "verify_file", "read_faiss", "write_faiss",
           "member_file", "sibling_tempdir", "commit_folder", "SAVED_GLOBS"]

#: the metadata file of a saved index (records, ids, parameters, checksum of the faiss file)
META_FILE = "case_index.json"
#: file-name patterns of the files a save writes (older ones are removed once a new manifest is in place)
SAVED_GLOBS = ("index-*.faiss", "refine-*.faiss", "trained-*.faiss", "shard*-*.faiss", "lists-*.ivfdata")


class CaseIndexError(DeployError):
    """A case index cannot be built, saved or loaded: the message names the file (if any) and the reason.

    A :class:`~medsim.errors.MedsimError` (via :class:`~medsim.deploy.DeployError`): the CLI exits with code 2."""


def load_faiss() -> Any:
    """The faiss module (imported on first use: importing medsim.deploy must stay cheap)."""
    try:
        import faiss  # noqa: PLC0415 - lazy on purpose: importing medsim.deploy must stay cheap
    except ImportError as exc:  # pragma: no cover - faiss is installed wherever the tests run
        raise CaseIndexError("faiss is not installed: install faiss-cpu (or faiss-gpu on a GPU host), "
                             "e.g. `pip install medsim[cpu]`") from exc
    return faiss


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(file: Path, meta: Mapping[str, Any], prefix: str, what: str, *, sha: str | None = None,
                size: int | None = None) -> None:
    """``file`` exists and has the size and sha256 that ``meta`` records (``<prefix>_bytes``, ``<prefix>_sha256``;
    or ``size``, ``sha``), else :class:`CaseIndexError` naming the file (``what``: how to call it)."""
    if not file.is_file():
        raise CaseIndexError(f"{file}: the {what} named in {META_FILE} is missing")
    got = file.stat().st_size
    want = meta.get(f"{prefix}_bytes") if size is None else size
    if want is not None and got != want:
        raise CaseIndexError(f"{file}: truncated or overwritten: {got} bytes, {want} expected")
    got_sha = sha256_file(file)
    want_sha = meta.get(f"{prefix}_sha256") if sha is None else sha
    if got_sha != want_sha:
        raise CaseIndexError(f"{file}: checksum mismatch (sha256 {got_sha[:16]}…, {META_FILE} records "
                             f"{str(want_sha)[:16]}…): the file is corrupted or was modified; restore it or rebuild "
                             "the index")


def write_faiss(index: Any, root: Path, prefix: str) -> tuple[str | None, str | None, int | None]:
    """``faiss.write_index`` to a temporary file, fsync, rename to ``<prefix>-<sha256[:16]>.faiss``."""
    if index is None:
        return None, None, None
    faiss = load_faiss()
    tmp = root / f".{prefix}.tmp{os.getpid()}"
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = sha256_file(tmp)
        size = tmp.stat().st_size
        name = f"{prefix}-{sha[:16]}.faiss"
        os.replace(tmp, root / name)
    except (RuntimeError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise CaseIndexError(f"{root}: cannot write the faiss {prefix} file ({exc})") from exc
    return name, sha, size


def read_faiss(file: Path, flags: int | None = None) -> Any:
    """``faiss.read_index`` (faiss' binary reader: nothing in the file is executed). By default on-disk inverted
    lists are opened read-only and only from the index file's own folder (``IO_FLAG_ONDISK_SAME_DIR``)."""
    faiss = load_faiss()
    if flags is None:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(file), flags)
    except RuntimeError as exc:
        raise CaseIndexError(f"{file}: faiss cannot read the index ({str(exc).splitlines()[0]})") from exc




def sibling_tempdir(root: Path, what: str) -> Path:
    """A new empty folder ``.<root name>.<what>-<random>`` beside ``root`` (same file system, so ``os.replace``
    can move it or its files into ``root``)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{root.name}.{what}-", dir=root.parent))


def commit_folder(tmp: Path, root: Path, keep: set[str]) -> None:
    """Move the saved index in ``tmp`` to ``root``. An absent or empty ``root`` is replaced by ``tmp`` in one
    ``os.replace``. Otherwise the files (content-addressed names, so no file of the current index is overwritten)
    move in first and ``case_index.json`` last — the commit point: until then the previous index stays loadable —
    then the files of earlier saves (matching :data:`SAVED_GLOBS`, not in ``keep``) are removed."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        os.replace(tmp, root)
        return
    for f in tmp.iterdir():
        if f.name != META_FILE:
            os.replace(f, root / f.name)
    os.replace(tmp / META_FILE, root / META_FILE)
    shutil.rmtree(tmp, ignore_errors=True)
    for pattern in SAVED_GLOBS:
        for old in root.glob(pattern):
            if old.name not in keep:
                old.unlink(missing_ok=True)


def member_file(root: Path, meta: dict[str, Any], field: str, meta_path: Path, name: Any = None) -> Path:
    """The file that ``meta[field]`` (or ``name``) names, which must be a plain file name inside ``root``: an
    absolute path, a sub-folder or ``..`` is refused (a manifest must not point faiss at files elsewhere)."""
    name = meta.get(field) if name is None else name
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or Path(name).is_absolute()):
        raise CaseIndexError(f"{meta_path}: field '{field}' must name a file inside the index folder "
                             f"(a plain file name), got {name!r}; rebuild the index with `medsim index build`")
    path = root / name
    if path.resolve().parent != root.resolve():  # e.g. a symlink out of the folder
        raise CaseIndexError(f"{meta_path}: field '{field}' ({name!r}) resolves to {path.resolve()}, outside the "
                             f"index folder {root.resolve()}")
    return path
