"""The large-collection kinds of :class:`~medsim.deploy.index.CaseIndex`: IVF indexes split into *parts* that faiss
searches together.

* ``"ondisk"``: one ``IndexIVF`` whose inverted lists live in an ``.ivfdata`` file (faiss ``OnDiskInvertedLists``,
  memory-mapped, opened read-only), so RAM holds only the coarse quantizer. Built the way faiss'
  ``demo_ondisk_ivf.py`` does: train the quantizer (and PQ codebooks) on a sample, add vectors in batches into
  in-memory IVF shards that are written to disk when they reach ``shard_size`` vectors, then merge every shard's
  lists into one ``.ivfdata`` file (``OnDiskInvertedLists.merge_from_multiple``, as ``faiss.contrib.ondisk``). Cases
  added to a loaded index go to new in-memory shards, searched beside the on-disk lists (``faiss.IndexShards``) and
  merged into a new ``.ivfdata`` file by the next save; the saved file is never written to.
* ``"sharded"``: ``faiss.IndexShards`` over ``shards`` in-memory IVF indexes with one trained quantizer, searched in
  parallel; each shard is saved as its own ``shard<i>-<sha256[:16]>.faiss``.

Both store ``flat`` codes (exact vectors: with ``nprobe = nlist`` the search is exact) or ``pq`` codes, and ids in
the inverted lists (``IndexIVF`` takes ids natively). Saving writes every file into a temporary folder beside the
index, then moves it into place (:func:`medsim.deploy.index_files.commit_folder`). Like ``index.py`` this module
imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medsim.deploy.index_files import META_FILE, CaseIndexError, commit_folder, load_faiss, member_file, \
    read_faiss, sha256_file, sibling_tempdir, verify_file, write_faiss
from medsim.errors import atomic_write_text

__all__ = ["IVFParts", "ivf_factory", "iter_chunks", "write_lists", "save_parts", "load_parts"]

log = logging.getLogger(__name__)


def ivf_factory(nlist: int, codes: str, m_pq: int | None, nbits: int) -> str:
    """``faiss.index_factory`` string of one part: ``"IVF{nlist},Flat"`` or ``"IVF{nlist},PQ{m_pq}x{nbits}np"``."""
    return f"IVF{nlist},Flat" if codes == "flat" else f"IVF{nlist},PQ{m_pq}x{nbits}np"


def write_lists(sources: list[Any], template: Any, file: Path) -> Any:
    """``template`` (an empty trained ``IndexIVF``) with the inverted lists of every index in ``sources`` merged into
    one ``OnDiskInvertedLists`` file ``file`` — ``faiss.contrib.ondisk.merge_ondisk``, on index objects (loaded,
    memory-mapped or in memory) instead of file names. Returns ``template``, now holding all the vectors."""
    faiss = load_faiss()
    ivf = faiss.extract_index_ivf(template)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(file))
    vec = faiss.InvertedListsPtrVector()
    for src in sources:
        vec.push_back(faiss.extract_index_ivf(src).invlists)
    ntotal = lists.merge_from_multiple(vec.data(), vec.size(), False)
    template.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    return template


def iter_chunks(vectors: Any, chunk_size: int) -> Iterator[np.ndarray]:
    """Row blocks of ``vectors``: slices of an ``(N, D)`` array or ``np.memmap`` (only one block in memory at a
    time), or the arrays an iterable yields, re-cut to at most ``chunk_size`` rows."""
    if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__"):
        for s in range(0, vectors.shape[0], chunk_size):
            yield vectors[s:s + chunk_size]
        return
    for block in vectors:
        block = np.asarray(block)
        for s in range(0, max(block.shape[0], 1) if block.ndim else 1, chunk_size):
            yield block[s:s + chunk_size]


# --------------------------------------------------------------------------- the parts

class IVFParts:
    """The IVF indexes behind an ``ondisk`` or ``sharded`` case index and the object that searches them all.

    ``template`` is the serialised empty trained index (quantizer, PQ codebooks) every part is cloned from;
    ``parts`` the indexes holding vectors. ``ondisk``: the saved part (on-disk lists, read-only), shards written
    to ``spill_dir`` (memory-mapped) and the in-memory shard receiving adds (last). ``sharded``: the ``shards``
    in-memory parts; adds are split evenly over them by ``IndexShards``."""

    def __init__(self, kind: str, template: np.ndarray, parts: list[Any], *, shard_size: int,
                 spill_parent: Path | None = None):
        self.kind = kind
        self.template = template
        self.parts = parts
        self.shard_size = int(shard_size)
        #: where ``ondisk`` shards go when full (a temporary folder under this, or the system's)
        self.spill_parent = spill_parent
        self.spill_dir: Path | None = None
        self.spilled: list[Path] = []
        #: the part read from a saved ``.ivfdata`` file (its lists are never written to), if any, and that file
        self.main: Any = None
        self.main_file: Path | None = None
        self._finalizer: Any = None
        self._searcher: Any = None
        #: the in-memory ``ondisk`` shard that receives adds (None: the next add starts one)
        self.filling: Any = parts[-1] if kind == "ondisk" and parts and parts[-1].ntotal == 0 else None

    @classmethod
    def from_trained(cls, kind: str, trained: Any, *, shards: int, shard_size: int) -> "IVFParts":
        faiss = load_faiss()
        template = faiss.serialize_index(trained)
        parts = [faiss.deserialize_index(template) for _ in range(shards if kind == "sharded" else 1)]
        return cls(kind, template, parts, shard_size=shard_size)

    def empty(self) -> Any:
        """A new empty part: the trained template, read back from its serialised bytes."""
        return load_faiss().deserialize_index(self.template)

    @property
    def ntotal(self) -> int:
        return int(sum(p.ntotal for p in self.parts))

    def searcher(self) -> Any:
        """The part itself when there is one, else ``faiss.IndexShards`` (threaded, ids kept) over all parts."""
        if len(self.parts) == 1:
            return self.parts[0]
        if self._searcher is None:
            faiss = load_faiss()
            shards = faiss.IndexShards(self.parts[0].d, True, False)
            for p in self.parts:
                shards.add_shard(p)  # not owned: self.parts keeps them alive
            self._searcher = shards
        return self._searcher

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        if self.kind == "sharded":
            self.searcher().add_with_ids(x, ids)
            return
        if self.filling is None or self.filling.ntotal >= self.shard_size:
            if self.filling is not None:
                self._spill()
            self.filling = self.empty()
            self.parts.append(self.filling)
            self._searcher = None
        self.filling.add_with_ids(x, ids)

    def _spill(self) -> None:
        """Write the full in-memory shard to ``spill_dir`` and keep it memory-mapped (``IO_FLAG_MMAP``), so RAM
        holds at most one shard of codes while a large collection is added."""
        faiss = load_faiss()
        if self.spill_dir is None:
            parent = self.spill_parent
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self.spill_dir = Path(tempfile.mkdtemp(prefix=".medsim-index-shards-", dir=parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.spill_dir), True)
        file = self.spill_dir / f"shard{len(self.spilled)}.faiss"
        try:
            faiss.write_index(self.filling, str(file))
        except RuntimeError as exc:
            raise CaseIndexError(f"{file}: cannot write a shard of the index ({exc})") from exc
        self.spilled.append(file)
        self.parts[self.parts.index(self.filling)] = read_faiss(file, faiss.IO_FLAG_MMAP)
        log.debug("wrote a shard of %d vectors to %s", self.filling.ntotal, file)
        self.filling = None
        self._searcher = None

    def remove_ids(self, ids: np.ndarray) -> int:
        """Delete ``ids`` from the in-memory parts (``sharded``); returns how many were removed."""
        faiss = load_faiss()
        sel = faiss.IDSelectorBatch(ids)
        removed = sum(int(p.remove_ids(sel)) for p in self.parts)
        if self._searcher is not None:
            self._searcher.syncWithSubIndexes()
        return removed

    def merged(self, folder: Path, name: str) -> Any:
        """All parts as one index whose lists are the file ``folder/name`` (``ondisk``). A single saved part is
        hard-linked (copied across file systems) rather than merged: saved lists are never modified."""
        file = folder / name
        if len(self.parts) == 1 and self.parts[0] is self.main:
            try:
                os.link(self.main_file, file)
            except OSError:
                shutil.copyfile(self.main_file, file)
            return self.parts[0]
        return write_lists(self.parts, self.empty(), file)

    def replace_with(self, part: Any, file: Path) -> None:
        """After a save: the merged part (lists in ``file``) is the only one; the spilled shards are deleted."""
        self.parts = [part]
        self.main, self.main_file = part, file
        self.filling = None
        self._searcher = None
        self.cleanup()

    def cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self.spill_dir, self.spilled, self._finalizer = None, [], None


def is_ondisk(index: Any) -> bool:
    """The inverted lists of ``index`` are ``OnDiskInvertedLists`` (an ``.ivfdata`` file)."""
    faiss = load_faiss()
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return isinstance(lists, faiss.OnDiskInvertedLists)


def ondisk_filename(index: Any) -> str:
    """The file name an on-disk index's lists record (as faiss resolved it when reading)."""
    faiss = load_faiss()
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename


def set_ondisk_filename(index: Any, name: str) -> None:
    faiss = load_faiss()
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = name


# --------------------------------------------------------------------------- save and load

def save_parts(parts: IVFParts | None, kind: str, root: Path, meta: dict[str, Any]) -> None:
    """Save the ``ondisk`` or ``sharded`` case ``index`` to the folder ``root``, through a temporary folder beside
    it (:func:`commit_folder`); on any error the temporary folder is removed and ``root`` is untouched.

    ``ondisk``: ``index-<sha>.faiss`` (the IVF index, its lists referring to the ``.ivfdata`` file by name; faiss
    finds it next to the index file: ``IO_FLAG_ONDISK_SAME_DIR``), ``lists-<sha>.ivfdata`` (all parts' lists
    merged) and ``trained-<sha>.faiss`` (the empty trained index that new cases are added to). ``sharded``: one
    ``shard<i>-<sha>.faiss`` per shard. ``meta``: the contents of ``case_index.json`` but for these files, whose
    names, sizes and sha256 this adds. ``ondisk``: afterwards ``parts`` is the saved part alone."""
    tmp = sibling_tempdir(root, "saving")
    try:
        merged = None
        fields: dict[str, Any] = {"index_file": None, "index_bytes": None, "index_sha256": None}
        if parts is not None and kind == "ondisk":
            merged = parts.merged(tmp, "lists.ivfdata.tmp")
            staged = tmp / "lists.ivfdata.tmp"
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            sha = sha256_file(staged)
            name = f"lists-{sha[:16]}.ivfdata"
            os.replace(staged, tmp / name)
            set_ondisk_filename(merged, name)  # a bare name: read back with IO_FLAG_ONDISK_SAME_DIR
            index_name, index_sha, index_size = write_faiss(merged, tmp, "index")
            trained_name, trained_sha, trained_size = write_faiss(parts.empty(), tmp, "trained")
            fields = {"index_file": index_name, "index_bytes": index_size, "index_sha256": index_sha,
                      "ivfdata_file": name, "ivfdata_bytes": (tmp / name).stat().st_size, "ivfdata_sha256": sha,
                      "trained_file": trained_name, "trained_bytes": trained_size, "trained_sha256": trained_sha}
        elif parts is not None:
            shard_files = []
            for i, part in enumerate(parts.parts):
                name, sha, size = write_faiss(part, tmp, f"shard{i}")
                shard_files.append({"file": name, "bytes": size, "sha256": sha})
            fields["shard_files"] = shard_files
        meta = {**meta, **fields}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, ensure_ascii=False, separators=(",", ":")))
        keep = {f.name for f in tmp.iterdir()}
        commit_folder(tmp, root, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if merged is not None:
        parts.replace_with(merged, root / fields["ivfdata_file"])


def _check_part(index: Any, part: Any, file: Path, nlist: int | None) -> int:
    """``part`` (read from ``file``) is the IVF index ``index.kind``/``codes``/``metric``/``dim`` describe."""
    faiss = load_faiss()
    part = faiss.downcast_index(part)
    want = faiss.IndexIVFFlat if index.codes == "flat" else faiss.IndexIVFPQ
    metric = faiss.METRIC_INNER_PRODUCT if index.metric == "ip" else faiss.METRIC_L2
    if type(part) is not want or part.metric_type != metric or part.d != index.dim or \
            (nlist is not None and part.nlist != nlist):
        raise CaseIndexError(f"{file}: holds a {type(part).__name__} (dim {part.d}, metric {part.metric_type}, "
                             f"nlist {getattr(part, 'nlist', '?')}), but the metadata describes a {want.__name__} "
                             f"(dim {index.dim}, metric {index.metric!r}, nlist {nlist}); rebuild the index with "
                             "`medsim index build`")
    return int(part.nlist)


def load_parts(index: Any, meta: dict[str, Any], meta_path: Path, root: Path) -> IVFParts | None:
    """The parts of a saved ``ondisk``/``sharded`` index (None when it was saved untrained). Every file named in
    the metadata must be a plain file name inside ``root`` (:func:`member_file`) with the recorded size and sha256;
    faiss reads them with its binary reader (nothing is executed) and the on-disk lists read-only, from the
    ``.ivfdata`` file next to the index file whatever path the faiss file records (``IO_FLAG_ONDISK_SAME_DIR``)."""
    faiss = load_faiss()
    nlist = meta["params"].get("nlist")
    if index.kind == "ondisk":
        if meta.get("index_file") is None:
            return None
        index_file = member_file(root, meta, "index_file", meta_path)
        lists_file = member_file(root, meta, "ivfdata_file", meta_path)
        trained_file = member_file(root, meta, "trained_file", meta_path)
        for file, prefix, what in ((index_file, "index", "faiss index file"), (trained_file, "trained",
                                   "trained faiss index file"), (lists_file, "ivfdata", "inverted-lists file")):
            verify_file(file, meta, prefix, what)
        main = read_faiss(index_file)
        nlist = _check_part(index, main, index_file, nlist)
        if not is_ondisk(main) or Path(ondisk_filename(main)).resolve() != lists_file.resolve():
            raise CaseIndexError(f"{index_file}: its inverted lists are not the file {lists_file.name} that "
                                 f"{META_FILE} names in 'ivfdata_file'; rebuild the index with `medsim index build`")
        trained = read_faiss(trained_file)  # an IVF with its lists in memory (checked below)
        _check_part(index, trained, trained_file, nlist)
        if trained.ntotal:
            raise CaseIndexError(f"{trained_file}: the trained template holds {trained.ntotal} vectors, 0 expected")
        parts = IVFParts("ondisk", faiss.serialize_index(trained), [main], shard_size=index.shard_size)
        parts.main, parts.main_file = main, lists_file
    else:
        entries = meta.get("shard_files")
        if entries is None:
            return None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise CaseIndexError(f"{meta_path}: field 'shard_files' must be a non-empty list of "
                                 "{file, bytes, sha256} entries")
        shards = []
        for j, e in enumerate(entries):
            file = member_file(root, meta, f"shard_files[{j}].file", meta_path, name=e.get("file"))
            verify_file(file, meta, "", f"shard {j} file", sha=e.get("sha256"), size=e.get("bytes"))
            shard = read_faiss(file)
            nlist = _check_part(index, shard, file, nlist)
            if is_ondisk(shard):
                raise CaseIndexError(f"{file}: a shard must hold its lists in memory, not in an .ivfdata file")
            shards.append(shard)
        template = faiss.clone_index(shards[0])
        template.reset()
        parts = IVFParts("sharded", faiss.serialize_index(template), shards, shard_size=index.shard_size)
    index.nlist = nlist
    return parts
