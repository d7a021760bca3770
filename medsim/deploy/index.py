"""Case-retrieval index of the deployment runtime: embeddings of known cases, their records, nearest-neighbour search.

:class:`CaseIndex` wraps a faiss index (exact ``flat``, compressed ``ivfpq`` or graph-based ``hnsw``) and keeps, for
every stored vector, a stable ``int64`` id and a JSON-serialisable *case record* (``{"uri": ..., "label": ...,
"patient": <hashed token>, "split": ...}``)::

    index = CaseIndex(128, kind="hnsw", metric="ip", model_id="isic-dsl-1.2.0")
    ids = index.add(embeddings, records)            # (N, 128) float32, N records -> (N,) int64 ids
    hits = index.search(query_embeddings, k=10)     # (Q, 128) -> Q lists of Hit(id, score, record)
    index.save("cases/")                            # case_index.json + index-<sha256>.faiss
    index = CaseIndex.load("cases/", expected_model_id="isic-dsl-1.2.0")

Collections too large for memory (10M+ cases) use ``kind="ondisk"`` (inverted lists in a memory-mapped
``.ivfdata`` file) or ``kind="sharded"`` (``faiss.IndexShards`` over IVF shards), see
:mod:`medsim.deploy.index_scale`, built in batches from an ``(N, D)`` memmap or an iterator of blocks::

    index = CaseIndex.build("cases/", np.load("emb.npy", mmap_mode="r"), kind="ondisk", model_id="isic-dsl-1.2.0")

Scores: ``metric="ip"`` (the default) is cosine similarity — vectors and queries are L2-normalised on the way in,
hits are sorted by decreasing score; ``metric="l2"`` returns *squared* Euclidean distances, sorted increasingly.

This module runs on inference hosts without torch or MONAI: it imports only the standard library, numpy and (lazily,
inside functions) faiss. Keep it that way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from medsim import __version__ as _medsim_version
from medsim.deploy.index_files import META_FILE, CaseIndexError, load_faiss, read_faiss, verify_file, write_faiss
from medsim.errors import atomic_write_text

__all__ = ["CaseIndex", "CaseIndexError", "ModelMismatchError", "Hit", "KINDS", "METRICS", "META_FILE",
           "default_nlist", "default_m_pq"]

log = logging.getLogger(__name__)

KINDS = ("flat", "ivfpq", "hnsw", "ondisk", "sharded")
METRICS = ("ip", "l2")
_FORMAT = "medsim-case-index"
#: 2: an ``ivfpq`` index with ``refine`` is one ``IndexIDMap2(IndexRefineFlat(IndexIVFPQ))`` file (version 1 kept
#: the exact vectors in a separate ``refine-*.faiss`` file; such indexes are converted when loaded)
_FORMAT_VERSION = 2
_INDEX_GLOB = "index-*.faiss"

Kind = Literal["flat", "ivfpq", "hnsw", "ondisk", "sharded"]
#: kinds whose quantizer is trained before the first add (the IVF kinds)
_TRAINED_KINDS = ("ivfpq", "ondisk", "sharded")
#: kinds built from IVF parts (medsim.deploy.index_scale)
_SCALE_KINDS = ("ondisk", "sharded")
Metric = Literal["ip", "l2"]

#: record keys that carry a patient identifier in clear (compared after lower-casing and dropping ``_``/``-``/spaces)
_PHI_KEYS = {
    "patientid": "patient_id", "patientname": "patient_name", "name": "name", "birthdate": "birth_date",
    "patientbirthdate": "birth_date", "dateofbirth": "birth_date", "dob": "birth_date", "mrn": "patient_id",
    "medicalrecordnumber": "patient_id",
}
#: record keys that may hold an identifier only as a keyed hash (``medsim.data.phi.Anonymizer``: ``p-<16 hex>``)
_HASHED_KEYS = ("patient", "study", "series", "group", "id")
_TOKEN = re.compile(r"^[a-z]+-[0-9a-f]{16}$")


class ModelMismatchError(CaseIndexError):
    """The saved index was built from the embeddings of another model (version) than the one in use."""


@dataclass(frozen=True)
class Hit:
    """One search result: the case id, its score (cosine similarity for ``ip``, squared L2 distance for ``l2``)
    and its case record."""

    id: int
    score: float
    record: Mapping[str, Any]


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` training vectors: about ``4·sqrt(n)``, at most ``n // 39`` (faiss wants ≥ 39
    training points per list) and at most 65536, at least 1."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39, 65536)))


def default_m_pq(dim: int) -> int:
    """PQ sub-quantizer count for ``dim``: the largest divisor of ``dim`` that is at most ``dim // 2`` (2-d
    sub-vectors: ``dim / 2`` bytes per vector at ``nbits=8``, 8× smaller than float32, recall@10 ≈ 0.95 on
    clustered embeddings). Pass ``m_pq=dim // 4`` for 16× compression at a visibly lower recall."""
    for m in range(max(1, dim // 2), 0, -1):
        if dim % m == 0:
            return m
    return 1  # pragma: no cover


class _NoRecords(Sequence):
    """``n`` empty case records, all the same ``{}`` (``add(..., records=None)``): 10M cases without records cost
    no 10M dicts."""

    _EMPTY: dict[str, Any] = {}

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return _NoRecords(len(range(*i.indices(self.n))))
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._EMPTY


def _chain_first(first: np.ndarray, rest: Any) -> Any:
    yield first
    yield from rest


def _shape_str(a: np.ndarray) -> str:
    return f"{tuple(a.shape)} {a.dtype}"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class CaseIndex:
    """Nearest-neighbour index of case embeddings with stable ids and case records.

    Args:
        dim: embedding size ``D``.
        kind: ``"flat"`` (exact, factory ``"IDMap2,Flat"``), ``"ivfpq"`` (``"IVF{nlist},PQ{m_pq}x{nbits}np"``:
            inverted lists of product-quantised codes, trained on the first :meth:`add` or an explicit :meth:`train`)
            or ``"hnsw"`` (``"IDMap2,HNSW{hnsw_m}"`` graph; CPU only). :attr:`factory_string` is the string used.
        metric: ``"ip"`` — cosine similarity, vectors are L2-normalised by the index — or ``"l2"`` (squared
            Euclidean distance on the vectors as given).
        nlist: IVF lists (``ivfpq``); default :func:`default_nlist` of the training-set size.
        m_pq: PQ sub-quantizers (``ivfpq``), must divide ``dim``; default :func:`default_m_pq`.
        nbits: bits per PQ code (``ivfpq``); training needs at least ``2**nbits`` vectors.
        hnsw_m: graph degree ``M`` (``hnsw``).
        ef_construction: candidate-list size while building the graph (``hnsw``). 120, not faiss' 40: on
            clustered embeddings (1M × 128, 1000 clusters) efConstruction=40 leaves clusters poorly linked and some
            queries stranded in the wrong cluster (recall@10 ≤ 0.88 at any efSearch); 120 fixes it for about twice
            the build time (see benchmarks/faiss_indexes.py).
        ef_search: default candidate-list size while searching (``hnsw``; raised to ``k`` when smaller).
        nprobe: default number of IVF lists visited per query (``ivfpq``).
        refine: ``ivfpq`` only: re-rank ``refine · k`` PQ candidates by exact distances on the full vectors, kept
            beside the codes (``dim · 4`` more bytes per case; 0: off): factory ``"IDMap2,IVF…,PQ…np,RFlat"``, an
            ``IndexRefineFlat`` with ``k_factor=refine`` inside an ``IndexIDMap2``. PQ distances are approximate,
            so the true neighbours are often found but mis-ordered: re-ranking 4·k candidates lifted recall@10
            from 0.93 to 0.998 on 1M × 128 in benchmarks/faiss_indexes.py.
        codes: ``ondisk`` and ``sharded``: what the inverted lists store, ``"flat"`` (the default: the float32
            vectors, ``4·dim`` bytes per case; with ``nprobe = nlist`` the search is exact) or ``"pq"`` (``m_pq``
            bytes per case at ``nbits=8``, approximate distances).
        shards: ``sharded``: number of IVF shards ``faiss.IndexShards`` searches in parallel (default 4).
        shard_size: ``ondisk``: vectors held in memory before a shard is written to a temporary file (the lists of
            all shards are merged into the index's ``.ivfdata`` file when it is saved).
        model_id: id of the model (and version) that produced the embeddings; :meth:`load` refuses an index
            built by another model.
        use_gpu: ``"auto"`` (use every GPU faiss sees, when there is one and the kind has a GPU version),
            ``True`` (require a GPU: :class:`CaseIndexError` when faiss sees none) or ``False``.

    Ids are ``int64``, assigned increasingly from 0 unless :meth:`add` is given ``ids``, and stored by faiss:
    ``IndexIDMap2`` maps them for ``flat``, ``hnsw`` and ``ivfpq`` with ``refine``; a plain ``ivfpq`` index keeps
    them in its inverted lists (``IndexIVF`` takes ids natively, and an ``IndexIDMap2`` over it would mis-map ids
    after a removal, because IVF lists do not renumber). Removed ids are never returned by :meth:`search`; where
    faiss cannot delete (``HNSW``, ``IndexRefine``) they are marked, filtered at search time with an ``IDSelector``,
    and dropped by :meth:`compact` once they outnumber the live vectors. The CPU index is the source of truth; on a
    GPU, a copy is (re)made for the first search after a change.
    """

    def __init__(self, dim: int, *, kind: Kind = "flat", metric: Metric = "ip", nlist: int | None = None,
                 m_pq: int | None = None, nbits: int = 8, hnsw_m: int = 32, ef_construction: int = 120,
                 ef_search: int = 64, nprobe: int = 16, refine: int = 0, codes: str | None = None,
                 shards: int | None = None, shard_size: int = 1_000_000, model_id: str, use_gpu: bool | str = "auto"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be 'ip' (cosine on L2-normalised vectors) or 'l2', got {metric!r}")
        if not isinstance(model_id, str) or not model_id.strip():
            raise ValueError(f"model_id must be a non-empty string naming the embedding model, got {model_id!r}")
        if m_pq is not None and (m_pq < 1 or dim % m_pq):
            raise ValueError(f"m_pq={m_pq} must be a positive divisor of dim={dim}")
        if not 1 <= nbits <= 16:
            raise ValueError(f"nbits must be in 1..16, got {nbits}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be positive, got {nlist}")
        for name, value in (("codes", codes), ("shards", shards)):
            if value is not None and kind not in _SCALE_KINDS:
                raise ValueError(f"{name}={value!r} applies to kind='ondisk' or 'sharded' only, not {kind!r}")
        codes = "flat" if codes is None else codes
        shards = 4 if shards is None else shards
        if codes not in ("flat", "pq"):
            raise ValueError(f"codes must be 'flat' (float32 vectors) or 'pq' (product-quantised), got {codes!r}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search),
                            ("nprobe", nprobe), ("shards", shards), ("shard_size", shard_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
            raise ValueError(f"refine must be a non-negative integer (0: off), got {refine!r}")
        if refine and kind != "ivfpq":
            raise ValueError(f"refine={refine} applies to kind='ivfpq' only ({kind} already ranks by exact "
                             "distances)")
        if use_gpu not in ("auto", True, False) or (not isinstance(use_gpu, (bool, str))):
            raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        self.dim = int(dim)
        self.kind: str = kind
        self.metric: str = metric
        self.model_id = model_id
        self.nlist = nlist
        self.codes = codes if kind in _SCALE_KINDS else None
        pq = kind == "ivfpq" or self.codes == "pq"
        self.m_pq = m_pq if m_pq is not None else (default_m_pq(self.dim) if pq else None)
        self.nbits = int(nbits)
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.nprobe = int(nprobe)
        self.refine = int(refine)
        self.shards = int(shards)
        self.shard_size = int(shard_size)
        self.created = _utc_now()
        #: free-form JSON metadata saved with the index (``medsim index build`` stores the export folder as
        #: ``model_dir``); checked like records: no identifier in clear
        self.info: dict[str, Any] = {}
        self._use_gpu_arg = use_gpu
        self.use_gpu = self._resolve_gpu(use_gpu)
        self._records: dict[int, dict[str, Any]] = {}
        self._tombstones: set[int] = set()
        self._next_id = 0
        self._gpu_index: Any = None
        #: positions -> ids of the GPU replica of a refine index (faiss' IndexIDMap2 wraps only empty indexes)
        self._gpu_ids: np.ndarray | None = None
        #: the IVF parts of an ``ondisk`` or ``sharded`` index (None before training and for the other kinds)
        self._parts: Any = None
        #: seconds spent in each step of :meth:`build` (``train_s``, ``add_s``, ``save_s``); empty otherwise
        self.build_timings: dict[str, float] = {}
        self._index: Any = None if kind in _TRAINED_KINDS else self._new_index()

    # ------------------------------------------------------------------ construction helpers

    def _resolve_gpu(self, use_gpu: bool | str) -> bool:
        if use_gpu is False:
            return False
        faiss = load_faiss()
        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if n == 0:
            if use_gpu is True:
                raise CaseIndexError("use_gpu=True, but faiss sees no GPU: this is a CPU-only faiss build "
                                     "(faiss-cpu) or no CUDA device is visible; install faiss-gpu on a GPU host, "
                                     "or pass use_gpu='auto' or False")
            return False
        if self.kind in ("hnsw", *_SCALE_KINDS):
            (log.warning if use_gpu is True else log.info)(
                "faiss has no GPU version of %s: the %s case index stays on the CPU",
                "HNSW" if self.kind == "hnsw" else "on-disk or sharded IVF lists", self.kind)
            return False
        log.info("case index (%s) will search on %d GPU(s)", self.kind, n)
        return True

    def _faiss_metric(self) -> int:
        faiss = load_faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    @property
    def factory_string(self) -> str | None:
        """The ``faiss.index_factory`` description of this index (None for ``ivfpq`` before training, whose list
        count is then still unknown), e.g. ``"IDMap2,HNSW32"`` or ``"IDMap2,IVF64,PQ32x8np,RFlat"``. ``np``: no
        polysemous training (it only reorders codes for Hamming filtering, which this index does not use)."""
        return self._factory_string(self.nlist)

    def _factory_string(self, nlist: int | None) -> str | None:
        if self.kind == "flat":
            return "IDMap2,Flat"
        if self.kind == "hnsw":
            return f"IDMap2,HNSW{self.hnsw_m}"
        if nlist is None:
            return None
        if self.kind in _SCALE_KINDS:
            from medsim.deploy.index_scale import ivf_factory

            return ivf_factory(nlist, self.codes, self.m_pq, self.nbits)
        ivfpq = f"IVF{nlist},PQ{self.m_pq}x{self.nbits}np"
        return f"IDMap2,{ivfpq},RFlat" if self.refine else ivfpq

    @property
    def _marks_removals(self) -> bool:
        """True where faiss cannot delete (HNSW, IndexRefine, saved on-disk lists): removed ids are tombstoned and
        filtered."""
        return self.kind in ("hnsw", "ondisk") or bool(self.refine)

    def _new_index(self, factory: str | None = None) -> Any:
        """A fresh, empty CPU index from ``factory`` (default :attr:`factory_string`; untrained for ``ivfpq``)."""
        faiss = load_faiss()
        index = faiss.index_factory(self.dim, factory or self.factory_string, self._faiss_metric())
        if self.kind == "hnsw":
            hnsw = faiss.downcast_index(index.index).hnsw
            hnsw.efConstruction = self.ef_construction
            hnsw.efSearch = self.ef_search
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = self.nprobe
            if self.refine:
                faiss.downcast_index(index.index).k_factor = float(self.refine)
        return index

    def _empty_like(self) -> Any:
        """An empty CPU index of the same structure and training as the current one (for :meth:`compact`)."""
        if self.kind != "ivfpq":
            return self._new_index()
        faiss = load_faiss()
        base = faiss.clone_index(faiss.extract_index_ivf(self._index))  # trained quantizer and codebooks
        base.reset()
        return self._wrap_refine(base) if self.refine else base

    def _wrap_refine(self, base: Any) -> Any:
        """``IndexIDMap2(IndexRefineFlat(base))`` with ``k_factor=refine``; the same object as the factory string
        ``"IDMap2,<base>,RFlat"`` builds, around an existing (trained, empty) base."""
        faiss = load_faiss()
        refine = faiss.IndexRefineFlat(base)
        refine.k_factor = float(self.refine)
        return faiss.IndexIDMap2(refine)

    # ------------------------------------------------------------------ validation

    def _matrix(self, x: Any, what: str, n_name: str = "N") -> np.ndarray:
        """``x`` as a C-contiguous ``(n, dim)`` float32 array (L2-normalised for ``ip``), or ValueError."""
        a = np.asarray(x)
        expected = f"expected ({n_name}, {self.dim}) float32 {what}"
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(f"{expected}, got {_shape_str(a)}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{expected}, got {_shape_str(a)} (not floating point)")
        a = np.ascontiguousarray(a, dtype=np.float32)
        finite = np.isfinite(a).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{what} contain NaN or infinite values in {bad.size} of {a.shape[0]} rows "
                             f"(first rows: {bad[:10].tolist()}); shape {_shape_str(a)}")
        if self.metric == "ip" and a.shape[0]:
            norms = np.linalg.norm(a, axis=1)
            if (norms == 0).any():
                bad = np.flatnonzero(norms == 0)
                raise ValueError(f"{what}: rows {bad[:10].tolist()} are all zeros and cannot be L2-normalised "
                                 f"for metric 'ip' (cosine)")
            if np.abs(norms - 1).max() > 1e-5:  # already unit vectors stay bit-identical
                a = a / norms[:, None]
        return a

    @staticmethod
    def _check_record(i: int, rec: Any) -> dict[str, Any]:
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} must be a dict (case record), got {type(rec).__name__}")
        CaseIndex._check_phi(f"record {i}", rec)
        try:
            json.dumps(rec, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record {i} is not JSON-serialisable ({exc}); records are saved as JSON") from None
        return dict(rec)

    @staticmethod
    def _check_phi(where: str, value: Any) -> None:
        """No key anywhere in ``value`` (nested dicts and lists included) names an identifier in clear, and the
        hashed-identifier keys (patient, study, series, group, id) hold ``Anonymizer`` tokens (or null) only."""
        if isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                CaseIndex._check_phi(f"{where}[{j}]", v)
            return
        if not isinstance(value, Mapping):
            return
        for key, v in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            norm = re.sub(r"[^a-z0-9]", "", key.lower())
            if norm in _PHI_KEYS:
                raise ValueError(
                    f"{where} has the key '{key}', which looks like a patient identifier in clear "
                    f"({_PHI_KEYS[norm]}); a case index must never hold one: hash identifiers with "
                    f"medsim.data.phi.Anonymizer (store them as 'patient': <token>) and drop names and birth dates")
            if key in _HASHED_KEYS and v is not None and not (isinstance(v, str) and _TOKEN.match(v)):
                raise ValueError(
                    f"{where}: '{key}' must be a hashed token like 'p-<16 hex digits>' (medsim.data.phi.Anonymizer), "
                    f"got a {type(v).__name__} that is not one; identifiers never go into a case index in clear")
            CaseIndex._check_phi(f"{where}.{key}", v)

    def _check_ids(self, ids: Any, what: str) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{what} must be a 1-d sequence of integers, got {_shape_str(a)}")
        return a.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        """Number of live (searchable) cases."""
        return len(self._records)

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, (int, np.integer)) and int(case_id) in self._records

    def __repr__(self) -> str:
        return (f"CaseIndex(dim={self.dim}, kind={self.kind!r}, metric={self.metric!r}, count={len(self)}, "
                f"model_id={self.model_id!r}, gpu={self.use_gpu}{f', refine={self.refine}' if self.refine else ''})")

    @property
    def is_trained(self) -> bool:
        """False only for an ``ivfpq`` index before its first :meth:`train`/:meth:`add`."""
        return self._index is not None and bool(self._index.is_trained)

    @property
    def faiss_index(self) -> Any:
        """The CPU faiss index (source of truth); None for an untrained ``ivfpq`` index. Read-only use."""
        return self._index

    def ids(self) -> np.ndarray:
        """The live ids, ``(len(self),)`` int64, in insertion order."""
        return np.fromiter(self._records.keys(), dtype=np.int64, count=len(self._records))

    def record(self, case_id: int) -> dict[str, Any]:
        """The record of ``case_id`` (KeyError naming the id when absent or removed)."""
        try:
            return self._records[int(case_id)]
        except KeyError:
            raise KeyError(f"case id {case_id} is not in the index (never added, or removed)") from None

    # ------------------------------------------------------------------ building

    @property
    def min_train_size(self) -> int:
        """Fewest vectors the first :meth:`add` / :meth:`train` accepts: ``max(2**nbits, nlist)`` for PQ codes
        (``ivfpq``, ``codes="pq"``), ``nlist`` for flat IVF codes (``nlist`` defaults to a size-dependent count that
        is always satisfiable), 0 for the other kinds or once trained."""
        if self.kind not in _TRAINED_KINDS or self._index is not None:
            return 0
        return max(2 ** self.nbits if self.m_pq else 1, self.nlist or 1)

    def train(self, vectors: Any) -> "CaseIndex":
        """Train the IVF quantizers (``ivfpq``, ``ondisk``, ``sharded``) on ``vectors`` ``(N, D)`` (a
        representative sample of the cases; at least :attr:`min_train_size` rows). No-op for ``flat`` and ``hnsw``.
        Returns ``self``."""
        if self.kind not in _TRAINED_KINDS:
            log.debug("%s index needs no training", self.kind)
            return self
        if len(self) or (self._index is not None and self._index.ntotal):
            raise CaseIndexError(f"the {self.kind} case index already holds vectors; retraining would invalidate "
                                 "their codes — build a new index instead")
        x = self._matrix(vectors, "training vectors")
        self._train(x)
        return self

    def _train(self, x: np.ndarray) -> None:
        faiss = load_faiss()
        n = x.shape[0]
        need = 2 ** self.nbits if self.m_pq else 1
        nlist = self.nlist if self.nlist is not None else default_nlist(n)
        if n < max(need, nlist):
            raise ValueError(
                f"{self.kind} needs at least max(2**nbits={need}, nlist={nlist}) training vectors, got {n}: add or "
                f"train() with more cases, lower nbits, or use kind='flat' (exact and fast for small collections)")
        factory = self._factory_string(nlist)
        index = self._new_index(factory)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # bounded training cost: at most 64 points per centroid, fewer iterations than faiss' default 25
        ivf.cp.max_points_per_centroid = 64
        ivf.cp.niter = 20
        if self.m_pq:
            ivf.pq.cp.max_points_per_centroid = 64
            ivf.pq.cp.niter = 15
        t0 = time.perf_counter()
        # 1) the coarse quantizer (k-means in D dimensions) with all threads ...
        clustering = faiss.Clustering(self.dim, nlist, ivf.cp)
        clustering.train(x, ivf.quantizer)
        # 2) ... then the PQ codebooks: k-means on (D / m_pq)-dimensional sub-vectors has too little work per
        # OpenMP region to gain from threads, and loses several times over when the cores are shared (measured:
        # 16 s with 2 threads vs 5 s with 1 on a busy 2-core host). IndexIVF.train skips the trained quantizer
        # (IndexIDMap2 and IndexRefineFlat pass training on to it).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.train(x)
        finally:
            faiss.omp_set_num_threads(threads)
        log.info("trained %s on %d vectors in %.1f s", factory, n, time.perf_counter() - t0)
        self.nlist = nlist
        if self.kind in _SCALE_KINDS:
            from medsim.deploy.index_scale import IVFParts

            self._parts = IVFParts.from_trained(self.kind, index, shards=self.shards, shard_size=self.shard_size)
            index = self._parts.searcher()
        self._index = index
        self._gpu_index = None

    def add(self, vectors: Any, records: Sequence[Mapping[str, Any]] | None = None, *, ids: Any = None
            ) -> np.ndarray:
        """Add ``N`` cases: ``vectors`` ``(N, D)`` float32 and one record (JSON-serialisable dict, no identifier in
        clear) per vector, or ``records=None``: empty records (one shared ``{}``: large collections whose cases
        are known by id alone). ``ids`` (``(N,)`` int64, new and unique) defaults to the next free ids. An
        untrained IVF index is trained on these vectors first. Returns the ``(N,)`` int64 ids. Nothing is added
        when any input is invalid (ValueError)."""
        x = self._matrix(vectors, "vectors")
        n = x.shape[0]
        if records is None:
            records = _NoRecords(n)
        if isinstance(records, (Mapping, str, bytes)) or not hasattr(records, "__len__"):
            raise ValueError(f"records must be a list of {n} dicts (one per vector), got {type(records).__name__}")
        if len(records) != n:
            raise ValueError(f"got {len(records)} records for {n} vectors of shape {_shape_str(x)}; "
                             f"give exactly one record per vector")
        recs = records if isinstance(records, _NoRecords) else [self._check_record(i, r) for i, r in
                                                                 enumerate(records)]
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new_ids = self._check_ids(ids, "ids")
            if new_ids.shape != (n,):
                raise ValueError(f"got {new_ids.shape[0]} ids for {n} vectors")
            if (new_ids < 0).any():
                raise ValueError(f"ids must be non-negative, got {new_ids[new_ids < 0][:10].tolist()}")
            if np.unique(new_ids).size != n:
                raise ValueError("ids contain duplicates")
            taken = [int(i) for i in new_ids if int(i) in self._records or int(i) in self._tombstones]
            if taken:
                raise ValueError(f"ids already used in this index: {taken[:10]}"
                                 f"{' …' if len(taken) > 10 else ''}")
        if n == 0:
            return new_ids
        if self._index is None:
            self._train(x)
        t0 = time.perf_counter()
        if self._parts is not None:
            self._parts.add(x, new_ids)
            self._index = self._parts.searcher()
        else:
            self._index.add_with_ids(x, new_ids)
        log.debug("added %d vectors to the %s case index in %.2f s", n, self.kind, time.perf_counter() - t0)
        self._records.update(zip(new_ids.tolist(), recs))
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._gpu_index = None
        return new_ids

    def add_batches(self, vectors: Any, records: Sequence[Mapping[str, Any]] | None = None, *, ids: Any = None,
                    chunk_size: int = 65_536, progress: bool = False) -> np.ndarray:
        """:meth:`add` block by block: ``vectors`` is an ``(N, D)`` array or ``np.memmap`` (read ``chunk_size`` rows
        at a time, so a memmap is never all in memory) or an iterable of ``(n_i, D)`` blocks; ``records`` and
        ``ids`` (optional) are sliced alongside. A tqdm bar counts cases when ``progress``. An ``ondisk`` index keeps
        at most ``shard_size`` vectors' codes in memory (full shards go to temporary files until :meth:`save`).
        Returns the ``(N,)`` int64 ids. A block that fails validation raises ValueError; the blocks before it stay
        added (in memory: a saved index changes only with :meth:`save`)."""
        from tqdm.auto import tqdm

        from medsim.deploy.index_scale import iter_chunks

        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        total = int(vectors.shape[0]) if hasattr(vectors, "shape") and len(vectors.shape) else None
        for name, given in (("records", records), ("ids", ids)):
            if given is not None and total is not None and len(given) != total:
                raise ValueError(f"got {len(given)} {name} for {total} vectors")
        out: list[np.ndarray] = []
        start = 0
        with tqdm(total=total, desc=f"indexing ({self.kind})", unit="case", unit_scale=True, disable=not progress,
                  leave=False) as bar:
            for block in iter_chunks(vectors, int(chunk_size)):
                m = int(np.shape(block)[0]) if np.ndim(block) else 1
                recs = None if records is None else records[start:start + m]
                block_ids = None if ids is None else np.asarray(ids)[start:start + m]
                try:
                    out.append(self.add(block, recs, ids=block_ids))
                except ValueError as exc:
                    raise ValueError(f"rows {start}-{start + m - 1} of the vectors: {exc}") from None
                start += m
                bar.update(m)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    @classmethod
    def build(cls, path: str | os.PathLike, vectors: Any, records: Sequence[Mapping[str, Any]] | None = None, *,
              ids: Any = None, chunk_size: int = 65_536, train_size: int | None = None, seed: int = 0,
              progress: bool = False, **params: Any) -> "CaseIndex":
        """Build a case index from ``vectors`` and save it to the folder ``path``; returns it.

        ``vectors``: an ``(N, D)`` float32 array or ``np.memmap`` — read in blocks of ``chunk_size`` rows, never all
        at once — or an iterable of ``(n_i, D)`` blocks. ``params``: the :class:`CaseIndex` arguments
        (``model_id``, ``kind``, ``nlist``, ...). IVF kinds are trained first, on ``train_size`` rows (default
        ``64 · nlist``, faiss' cap on points per centroid, at least :attr:`min_train_size`), drawn at random
        (``seed``) from an array, or the first rows of an iterable; ``nlist`` defaults to :func:`default_nlist` of
        ``N`` (of the training rows for an iterable). Then :meth:`add_batches` and :meth:`save`.

        Nothing is written to ``path`` before the index is complete: temporary shards go to a folder beside it,
        removed on success and on any error (an interrupted build leaves neither an index nor temporary files; a
        killed process can leave a ``.<name>.building-*`` or ``.<name>.saving-*`` folder, never read, to delete).
        The returned index's :attr:`build_timings` holds the seconds spent training, adding and saving."""
        from medsim.deploy.index_scale import iter_chunks, sibling_tempdir

        root = Path(path)
        if root.exists() and not root.is_dir():
            raise CaseIndexError(f"{root}: cannot build a case index there: it is a file, not a directory")
        if hasattr(vectors, "shape"):
            if len(vectors.shape) != 2:
                raise ValueError(f"expected (N, D) float32 vectors, got shape {tuple(vectors.shape)}")
            n, dim = (int(v) for v in vectors.shape)
            blocks: Any = vectors
        else:
            n = None
            it = iter_chunks(vectors, chunk_size)
            head = next(it, None)
            if head is None or head.ndim != 2:
                raise ValueError("vectors: the iterable yielded no (n, D) block")
            dim = int(head.shape[1])
            blocks = _chain_first(head, it)
        index = cls(dim, **params)
        staging = sibling_tempdir(root, "building")
        t = [time.perf_counter()]
        try:
            if index.kind in _TRAINED_KINDS:
                blocks = index._train_for_build(blocks, n, train_size, seed)
                if index._parts is not None:
                    index._parts.spill_parent = staging
            t.append(time.perf_counter())
            index.add_batches(blocks, records, ids=ids, chunk_size=chunk_size, progress=progress)
            t.append(time.perf_counter())
            index.save(root)
            t.append(time.perf_counter())
            index.build_timings = dict(zip(("train_s", "add_s", "save_s"), np.diff(t).tolist()))
            log.info("built %s in %s (%s)", index, root, ", ".join(f"{k} {v:.1f}" for k, v in
                                                                    index.build_timings.items()))
        finally:
            if index._parts is not None:
                index._parts.cleanup()
                index._parts.spill_parent = None
            shutil.rmtree(staging, ignore_errors=True)
        return index

    def _train_for_build(self, blocks: Any, n: int | None, train_size: int | None, seed: int) -> Any:
        """Train on a sample of ``blocks`` (see :meth:`build`); returns what is still to be added."""
        if n is not None and self.nlist is None:
            self.nlist = default_nlist(n)
        want = int(train_size) if train_size else max(64 * (self.nlist or 4096), self.min_train_size)
        if n is not None:
            want = min(want, n)
            rows = np.sort(np.random.default_rng(seed).choice(n, size=want, replace=False))
            self.train(blocks[rows])
            return blocks
        head: list[np.ndarray] = []
        got = 0
        for block in blocks:  # the first `want` rows of an iterable
            head.append(np.asarray(block))
            got += head[-1].shape[0]
            if got >= want:
                break
        sample = np.concatenate(head)
        self.train(sample[:want])
        return _chain_first(sample, blocks)

    def remove(self, ids: Any) -> int:
        """Remove the cases ``ids`` (int or ``(n,)`` ints, all present: ValueError naming the unknown ones, and
        nothing removed). Returns the number removed."""
        rm = np.unique(self._check_ids(ids, "ids"))
        unknown = [int(i) for i in rm if int(i) not in self._records]
        if unknown:
            raise ValueError(f"ids not in the index (never added, or already removed): {unknown[:10]}"
                             f"{' …' if len(unknown) > 10 else ''}")
        if rm.size == 0:
            return 0
        if self._marks_removals:  # faiss HNSW / IndexRefine cannot delete: mark, filter at search, compact later
            self._tombstones.update(rm.tolist())
        else:
            removed = self._parts.remove_ids(rm) if self._parts is not None else self._index.remove_ids(rm)
            if removed != rm.size:  # pragma: no cover - faiss and the records disagree
                raise CaseIndexError(f"faiss removed {removed} of {rm.size} ids; the index is inconsistent")
        for i in rm.tolist():
            del self._records[i]
        self._gpu_index = None
        if self._marks_removals and self.kind != "ondisk" and len(self._tombstones) > max(len(self._records), 1000):
            self.compact()
        return int(rm.size)

    def compact(self) -> None:
        """Rebuild an ``hnsw`` graph or a ``refine`` index without its removed vectors, re-adding the live ones
        (exact vectors: the HNSW storage, or the refine index's full copies); no-op for other kinds or without
        removals. ``ondisk`` keeps its removed vectors (filtered at search time; rebuild to drop them)."""
        if not self._marks_removals or not self._tombstones or self.kind == "ondisk":
            return
        t0 = time.perf_counter()
        live = self.ids()
        x = self._index.reconstruct_batch(live) if live.size else np.zeros((0, self.dim), np.float32)
        index = self._empty_like()
        if live.size:
            index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), live)
        self._index = index
        self._gpu_index = None
        dropped = len(self._tombstones)
        self._tombstones.clear()
        log.info("compacted the %s case index: dropped %d removed vectors, kept %d (%.1f s)", self.factory_string,
                 dropped, live.size, time.perf_counter() - t0)

    # ------------------------------------------------------------------ search

    def _searcher(self) -> Any:
        if not self.use_gpu:
            return self._index
        if self._gpu_index is None:
            faiss = load_faiss()
            try:
                co = faiss.GpuMultipleClonerOptions()
                co.useFloat16 = True  # IVF-PQ lookup tables for many sub-quantizers
                if self.refine:
                    self._gpu_index = self._gpu_refine_replica(co)
                else:
                    self._gpu_index = faiss.index_cpu_to_all_gpus(self._index, co=co)
            except (RuntimeError, AttributeError) as exc:
                if self._use_gpu_arg is True:
                    raise CaseIndexError(f"cannot copy the {self.kind} case index to the GPU: {exc}") from exc
                log.warning("cannot copy the %s case index to the GPU (%s); searching on the CPU", self.kind, exc)
                self.use_gpu = False
                return self._index
        return self._gpu_index

    def _gpu_refine_replica(self, co: Any) -> Any:
        """The GPU replica of a ``refine`` index: faiss has no GPU ``IndexRefine``, so the IVF-PQ base goes to the
        GPU(s) and an ``IndexRefine`` on the CPU re-ranks its candidates against the CPU's full vectors (shared, not
        copied). GPU IVF search takes no ``IDSelector``, so removed vectors are compacted away first. Searching it
        returns storage positions; :attr:`_gpu_ids` maps them to ids."""
        faiss = load_faiss()
        self.compact()
        cpu = faiss.downcast_index(self._index.index)  # the IndexRefineFlat inside the IndexIDMap2
        base = faiss.index_cpu_to_all_gpus(cpu.base_index, co=co)
        replica = faiss.IndexRefine(base, cpu.refine_index)
        replica.k_factor = float(self.refine)
        replica.own_fields = False
        self._gpu_parts = (base, cpu)  # the replica points at both without owning them
        self._gpu_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        return replica

    def search_arrays(self, queries: Any, k: int, *, nprobe: int | None = None,
                      ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``queries`` ``(Q, D)`` -> ``(scores (Q, k) float32, ids (Q, k) int64)``, best first; where
        fewer than ``k`` cases qualify, ids are ``-1`` (scores then are faiss' sentinels). ``nprobe`` (IVF kinds)
        and ``ef_search`` (``hnsw``) override the index defaults for this call."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._matrix(queries, "queries", "Q")
        k = int(k)
        nq = q.shape[0]
        if nq == 0 or self._index is None or self._index.ntotal == 0:
            return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
        faiss = load_faiss()
        index = self._searcher()
        on_gpu = index is not self._index
        params = None
        keep: list[Any] = []  # selector objects must outlive the search call
        removed = None
        if self._tombstones and not on_gpu:  # faiss cannot delete from this kind: skip the marked ids
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
            removed = faiss.IDSelectorNot(batch)
            keep += [batch, removed]
        if self.kind == "ivfpq":
            probe = int(nprobe if nprobe is not None else self.nprobe)
            if on_gpu:
                gpu_ivf = index.base_index if self.refine else index
                faiss.GpuParameterSpace().set_index_parameter(gpu_ivf, "nprobe", probe)
            elif self.refine:
                base_params = faiss.SearchParametersIVF(nprobe=probe)
                if removed is not None:
                    # IndexIDMap2 translates only a top-level selector, which IndexRefine does not forward: the
                    # base searches storage positions, so translate the ids through the id map here
                    base_params.sel = faiss.IDSelectorTranslated(self._index.id_map, removed)
                    keep.append(base_params.sel)
                params = faiss.IndexRefineSearchParameters(k_factor=float(self.refine))
                params.base_index_params = base_params
                keep.append(base_params)
            else:
                params = faiss.SearchParametersIVF(nprobe=probe)
        elif self.kind in _SCALE_KINDS:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe if nprobe is not None else self.nprobe))
            if removed is not None:
                params.sel = removed  # IVF lists hold the ids: no translation (IndexShards passes it to every part)
        elif self.kind == "hnsw":
            ef = max(int(ef_search if ef_search is not None else self.ef_search), k)
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if removed is not None:
                params.sel = removed  # IndexIDMap2 translates it to storage positions
        # pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search process-wide with
        # a wrapper that has no `params`; the original numpy method stays available as `search_numpy`
        search = getattr(index, "search_numpy", index.search)
        scores, ids = search(q, k, params=params) if params is not None else search(q, k)
        del keep
        if on_gpu and self.refine:  # the replica returns storage positions
            ids = np.where(ids >= 0, self._gpu_ids[np.maximum(ids, 0)], -1)
        return scores, ids

    def search(self, queries: Any, k: int = 10, *, nprobe: int | None = None,
               ef_search: int | None = None) -> list[list[Hit]]:
        """The ``k`` nearest cases of each query: ``queries`` ``(Q, D)`` -> ``Q`` lists of :class:`Hit` (fewer
        than ``k`` when the index holds fewer cases), best first — decreasing cosine similarity for ``ip``,
        increasing squared L2 distance for ``l2``."""
        scores, ids = self.search_arrays(queries, k, nprobe=nprobe, ef_search=ef_search)
        records = self._records
        out: list[list[Hit]] = []
        for srow, irow in zip(scores.tolist(), ids.tolist()):
            out.append([Hit(i, s, records[i]) for s, i in zip(srow, irow) if i >= 0 and i in records])
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Save into the directory ``path`` (created): ``index-<sha256[:16]>.faiss`` (``faiss.write_index``) and
        ``case_index.json`` (model_id, dim, kind, metric, parameters, count, created, faiss version, the index
        file's name, size and sha256, ids, records). Each file is written under a temporary name and moved into
        place; replacing ``case_index.json`` is the commit point, so a crash leaves the previous index loadable.
        ``ondisk`` and ``sharded`` indexes are written into a temporary folder beside ``path`` first
        (:func:`medsim.deploy.index_scale.save_parts`). Returns the directory."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise CaseIndexError(f"{root}: cannot save a case index there: it is a file, not a directory")
        if self.kind in _SCALE_KINDS:
            from medsim.deploy.index_scale import save_parts

            self._check_info(root)
            save_parts(self._parts, self.kind, root, self._meta(None, None, None))
            if self._parts is not None:
                self._index = self._parts.searcher()  # ondisk: now the merged lists in root
            log.info("saved %s to %s", self, root)
            return root
        root.mkdir(parents=True, exist_ok=True)
        index_name, sha, size = write_faiss(self._index, root, "index")
        self._check_info(root)
        meta = self._meta(index_name, sha, size)
        atomic_write_text(root / META_FILE, json.dumps(meta, ensure_ascii=False, separators=(",", ":")))
        # index files of earlier saves (refine-*.faiss: the exact vectors of a format-1 refine index)
        for old in [*root.glob(_INDEX_GLOB), *root.glob("refine-*.faiss")]:
            if old.name != index_name:
                old.unlink(missing_ok=True)
        log.info("saved %s to %s (%d cases, %s bytes)", self, root, meta["count"], size)
        return root

    def _check_info(self, root: Path) -> None:
        try:
            self._check_phi("info", self.info)
            json.dumps(self.info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CaseIndexError(f"{root}: cannot save the index's info ({exc})") from exc

    def _meta(self, index_name: str | None, sha: str | None, size: int | None) -> dict[str, Any]:
        """The contents of ``case_index.json`` (its index-file fields: ``index_name``, ``sha``, ``size``)."""
        faiss = load_faiss()
        ids = list(self._records.keys())
        scale = {"codes": self.codes, "shards": self.shards, "shard_size": self.shard_size} \
            if self.kind in _SCALE_KINDS else {}
        return {
            "format": _FORMAT, "format_version": _FORMAT_VERSION,
            "model_id": self.model_id, "dim": self.dim, "kind": self.kind, "metric": self.metric,
            "count": len(ids), "created": self.created, "saved": _utc_now(),
            "faiss_version": getattr(faiss, "__version__", "unknown"), "medsim_version": _medsim_version,
            "params": {"nlist": self.nlist, "m_pq": self.m_pq, "nbits": self.nbits, "hnsw_m": self.hnsw_m,
                       "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                       "nprobe": self.nprobe, "refine": self.refine, **scale},
            "factory_string": self.factory_string,
            "index_file": index_name, "index_bytes": size, "index_sha256": sha,
            "next_id": self._next_id, "tombstones": sorted(self._tombstones),
            "ids": ids, "records": [self._records[i] for i in ids], "info": self.info,
        }

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_model_id: str | None = None,
             use_gpu: bool | str = "auto") -> "CaseIndex":
        """Load an index saved by :meth:`save` (``path``: its directory or its ``case_index.json``).

        Raises :class:`ModelMismatchError` when ``expected_model_id`` is given and differs from the model the index
        was built with, and :class:`CaseIndexError` naming the file and the reason when a file is missing,
        truncated, corrupted (sha256 mismatch) or inconsistent."""
        p = Path(path)
        root, meta_path = (p.parent, p) if p.name == META_FILE and p.is_file() else (p, p / META_FILE)
        if not meta_path.is_file():
            raise CaseIndexError(f"{meta_path}: no case index here ({META_FILE} is missing)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CaseIndexError(f"{meta_path}: unreadable case index metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise CaseIndexError(f"{meta_path}: not a medsim case index (format {_FORMAT!r} expected)")
        if meta.get("format_version", 0) > _FORMAT_VERSION:
            raise CaseIndexError(f"{meta_path}: format version {meta.get('format_version')} is newer than this "
                                 f"medsim understands ({_FORMAT_VERSION}); upgrade medsim")
        missing = [k for k in ("model_id", "dim", "kind", "metric", "params", "index_file", "ids", "records")
                   if k not in meta]
        if missing:
            raise CaseIndexError(f"{meta_path}: metadata lacks {', '.join(missing)}")
        if expected_model_id is not None and meta["model_id"] != expected_model_id:
            raise ModelMismatchError(
                f"{root}: the case index was built with model '{meta['model_id']}', but the model in use is "
                f"'{expected_model_id}'; embeddings of different models are not comparable — rebuild the index "
                f"with `medsim index build`")
        try:
            obj = cls._from_meta(meta, meta_path, root, use_gpu)
        except CaseIndexError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError) as exc:  # a hand-edited case_index.json
            raise CaseIndexError(f"{meta_path}: malformed case index metadata ({type(exc).__name__}: {exc}); "
                                 "rebuild the index with `medsim index build`") from exc
        log.info("loaded %s from %s", obj, root)
        return obj

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], meta_path: Path, root: Path, use_gpu: bool | str) -> "CaseIndex":
        params = meta["params"]
        try:
            obj = cls(meta["dim"], kind=meta["kind"], metric=meta["metric"], nlist=params.get("nlist"),
                      m_pq=params.get("m_pq"), nbits=params.get("nbits", 8), hnsw_m=params.get("hnsw_m", 32),
                      ef_construction=params.get("ef_construction", 120), ef_search=params.get("ef_search", 64),
                      nprobe=params.get("nprobe", 16), refine=params.get("refine", 0),
                      codes=params.get("codes"), shards=params.get("shards"),
                      shard_size=params.get("shard_size", 1_000_000), model_id=meta["model_id"], use_gpu=use_gpu)
        except ValueError as exc:
            raise CaseIndexError(f"{meta_path}: invalid parameters ({exc})") from exc
        obj.created = meta.get("created", obj.created)
        ids, records = meta["ids"], meta["records"]
        if len(ids) != len(records) or meta.get("count", len(ids)) != len(ids):
            raise CaseIndexError(f"{meta_path}: {len(ids)} ids, {len(records)} records and count "
                                 f"{meta.get('count')} disagree")
        tombstones = set(int(i) for i in meta.get("tombstones", []))
        expected_total = len(ids) + len(tombstones)
        if obj.kind in _SCALE_KINDS:
            from medsim.deploy.index_scale import load_parts

            obj._parts = load_parts(obj, meta, meta_path, root)
            index = obj._parts.searcher() if obj._parts is not None else None
            if index is None and ids:
                raise CaseIndexError(f"{meta_path}: no index file recorded for {len(ids)} cases")
            if index is not None and index.ntotal != expected_total:
                raise CaseIndexError(f"{root}: the {obj.kind} index holds {index.ntotal} vectors, the metadata says "
                                     f"{expected_total}")
        elif meta["index_file"] is None:
            if ids or meta["kind"] != "ivfpq":
                raise CaseIndexError(f"{meta_path}: no index file recorded for {len(ids)} cases")
            index = None
        else:
            from medsim.deploy.index_scale import member_file

            index = cls._read_verified(member_file(root, meta, "index_file", meta_path), meta)
            if index.ntotal != expected_total or index.d != obj.dim:
                raise CaseIndexError(f"{root / meta['index_file']}: holds {index.ntotal} vectors of dim {index.d}, "
                                     f"the metadata says {expected_total} of dim {obj.dim}")
        faiss = load_faiss()
        if meta.get("faiss_version") not in (None, getattr(faiss, "__version__", None)):
            log.info("case index %s was written by faiss %s, reading with %s", root, meta.get("faiss_version"),
                     getattr(faiss, "__version__", "?"))
        if index is not None and obj.kind == "ivfpq":
            obj.nlist = int(faiss.extract_index_ivf(index).nlist)
        if index is not None and obj.refine and meta.get("format_version", 0) < 2:
            index = obj._refine_from_format_1(index, meta, meta_path, root, len(ids))
        if index is not None and obj.kind not in _SCALE_KINDS:
            cls._check_structure(obj, index, meta_path)
        obj._index = index
        empty = _NoRecords._EMPTY  # cases saved without a record share one {} (10M cases: no 10M dicts)
        obj._records = {int(i): empty if r == {} else dict(r) for i, r in zip(ids, records)}
        obj._tombstones = tombstones
        obj.info = dict(meta.get("info") or {})
        obj._next_id = int(meta.get("next_id", max([*map(int, ids), *tombstones], default=-1) + 1))
        return obj

    def _refine_from_format_1(self, base: Any, meta: dict[str, Any], meta_path: Path, root: Path,
                              count: int) -> Any:
        """A format-1 ``refine`` index (an ``IndexIVFPQ`` with native ids + ``refine-*.faiss``, an
        ``IndexIDMap2(IndexFlat)`` of the full vectors) as this version's ``IndexIDMap2(IndexRefineFlat)``: the
        trained base, emptied, re-encodes the full vectors (PQ encoding is deterministic: the same codes)."""
        faiss = load_faiss()
        if not meta.get("refine_file"):
            raise CaseIndexError(f"{meta_path}: refine={self.refine} but no refine_file is recorded")
        exact = self._read_verified(root / meta["refine_file"], meta, "refine")
        if exact.ntotal != count or exact.d != self.dim:
            raise CaseIndexError(f"{root / meta['refine_file']}: holds {exact.ntotal} vectors of dim {exact.d}, "
                                 f"the metadata says {count} of dim {self.dim}")
        ids = faiss.vector_to_array(exact.id_map).astype(np.int64)
        vectors = faiss.downcast_index(exact.index).reconstruct_n(0, exact.ntotal)
        base.reset()
        index = self._wrap_refine(base)
        if ids.size:
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        log.info("converted the format-1 refine index %s to %s (one faiss file from the next save on)", root,
                 self.factory_string)
        return index

    @staticmethod
    def _check_structure(obj: "CaseIndex", index: Any, meta_path: Path) -> None:
        """The loaded faiss object has the structure :attr:`factory_string` describes (a hand-edited
        ``kind``/``refine`` would otherwise search the wrong way)."""
        faiss = load_faiss()
        fresh = faiss.index_factory(obj.dim, obj.factory_string, obj._faiss_metric())

        def chain(ix: Any) -> list[str]:
            names = []
            while ix is not None:
                ix = faiss.downcast_index(ix)
                names.append(re.sub(r"^IndexFlat(IP|L2)$", "IndexFlat", type(ix).__name__))  # metric: below
                ix = ix.index if isinstance(ix, faiss.IndexIDMap2) else (
                    ix.base_index if isinstance(ix, faiss.IndexRefine) else None)
            return names

        got, want = chain(index), chain(fresh)
        if got != want or index.metric_type != fresh.metric_type:
            raise CaseIndexError(f"{meta_path}: the faiss file holds {'(' .join(got)}{')' * (len(got) - 1)} "
                                 f"(metric {index.metric_type}), but kind={obj.kind!r}, metric={obj.metric!r}, "
                                 f"refine={obj.refine} need {obj.factory_string!r}; rebuild the index with "
                                 "`medsim index build`")

    @staticmethod
    def _read_verified(file: Path, meta: dict[str, Any], prefix: str = "index") -> Any:
        verify_file(file, meta, prefix, f"faiss {prefix} file")
        return read_faiss(file)

