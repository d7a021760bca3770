"""Embeddings from a model served by Triton Inference Server, through the same :class:`EmbeddingEngine` API.

``medsim export RUN --out OUT --triton`` writes the model repository (``deploy/triton/launch.sh`` serves it); this
module is the other side: :class:`TritonRunner` sends preprocessed batches to the server with ``tritonclient.http``
(KServe v2 protocol: ``GET /v2/health/ready``, ``GET /v2/models/<name>/ready``, ``GET /v2/models/<name>``,
``POST /v2/models/<name>/infer`` with binary or JSON tensors) and returns ``{output: (N, ...)}`` like the local
runners of :mod:`medsim.runtime.runners`. :class:`~medsim.deploy.EmbeddingEngine` runs on it when its backend is
``"triton=URL"``: preprocessing and batching still happen here, from the export's ``manifest.json``, so a search
embeds its queries exactly as with the local backends and then queries the faiss index as usual::

    medsim search --index IDX --backend triton http://127.0.0.1:8000 query.png
    EmbeddingEngine(model_dir, backend="triton=http://127.0.0.1:8000")   # the library spelling

The model's name on the server is the export manifest's ``triton.name``; a URL ending in ``/v2/models/NAME``
names another. Any failure — server down, model not loaded, a different model, an inference error — is a
:class:`~medsim.deploy.DeployError` naming the URL and the reason (``medsim`` prints it and exits 2).

No PyTorch: ``tritonclient`` (``pip install 'medsim[triton]'``) is imported only when a runner is opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from medsim.runtime.errors import BackendUnavailable, DeployError

__all__ = ["TRITON_PREFIX", "TritonAddress", "parse_url", "triton_url", "TritonRunner", "triton_runner"]

logger = logging.getLogger(__name__)

#: ``backend`` values ``"triton=URL"`` select a Triton server (``medsim ... --backend triton URL``)
TRITON_PREFIX = "triton="
TRITON_HINT = "pip install 'medsim[triton]' (tritonclient[http])"
#: KServe v2 data type of medsim's tensors (inputs and outputs are float32)
FP32 = "FP32"


@dataclass(frozen=True)
class TritonAddress:
    """A Triton server URL taken apart: ``url`` as given, ``host`` (``host:port[/base path]``, what
    ``tritonclient.http`` wants), ``ssl`` (https), ``model``/``version`` when the URL names them."""

    url: str
    host: str
    ssl: bool
    model: str | None = None
    version: str = ""


def parse_url(url: str) -> TritonAddress:
    """``http[s]://HOST:PORT[/prefix][/v2/models/NAME[/versions/N]]`` → :class:`TritonAddress`.

    Raises:
        DeployError: not an http(s) URL with a host (the message shows the expected form).
    """
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DeployError(f"Triton server URL '{url}' is not an http(s) URL; give e.g. http://127.0.0.1:8000 "
                          "(Triton's HTTP port; optionally ending in /v2/models/NAME)")
    path, model, version = parts.path.rstrip("/"), None, ""
    head, sep, tail = path.partition("/v2/models/")
    if sep:
        model, _, rest = tail.partition("/")
        if rest.startswith("versions/"):
            version = rest[len("versions/"):]
        elif rest:
            raise DeployError(f"Triton server URL '{url}': expected .../v2/models/NAME[/versions/N] at its end")
        path = head
    return TritonAddress(url=str(url).strip(), host=parts.netloc + path, ssl=parts.scheme == "https",
                         model=model or None, version=version)


def triton_url(backend: Any) -> str | None:
    """The server URL of a ``"triton=URL"`` backend value; ``None`` for the local backends."""
    if isinstance(backend, str) and backend.startswith(TRITON_PREFIX):
        return backend[len(TRITON_PREFIX):]
    return None


def _import_http() -> Any:
    try:
        import tritonclient.http as http
    except ImportError as e:
        raise BackendUnavailable(f"the triton backend needs tritonclient ({e}): {TRITON_HINT}") from e
    return http


class TritonRunner:
    """A model on a Triton server as a medsim runner: ``runner(x)`` with a (B, C, *S) float32 batch returns
    ``{output: (B, ...)}`` float32 (the protocol of :mod:`medsim.runtime.runners`).

    Opening it checks, in order, that the server is ready, that the model is loaded and ready, and that it has
    one FP32 input and every output asked for (``output_names``; default: all the server lists).

    Args:
        url: the server (``http://HOST:8000``; a URL ending in ``/v2/models/NAME`` also names the model).
        model: the model's name on the server (``url``'s wins when both are given).
        output_names: outputs to request, in the order returned.
        binary: send and receive tensors as binary data (``False``: JSON arrays, slower, for debugging proxies).
        timeout_s: connection and network timeout of each request.

    Attributes:
        input_name, output_names: the model's tensors; max_batch: the config's ``max_batch_size`` (``None`` when
            the server does not say or the model does not batch).

    Raises:
        DeployError: the server cannot be reached or is not ready, the model is not ready or does not have the
            expected tensors (each message names the URL and the reason); BackendUnavailable: no tritonclient.
    """

    backend = "triton"

    def __init__(self, url: str, model: str | None = None, *, output_names: Sequence[str] | None = None,
                 binary: bool = True, timeout_s: float = 60.0):
        self.address = parse_url(url)
        self.url = self.address.url
        self.model = self.address.model or model
        if not self.model:
            raise DeployError(f"Triton server {self.url}: no model name; give it in the URL "
                              f"({self.url.rstrip('/')}/v2/models/NAME)")
        self.version, self.binary = self.address.version, bool(binary)
        self._http = _import_http()
        self.client = None
        self.client = self._call("connecting", lambda: self._http.InferenceServerClient(
            self.address.host, ssl=self.address.ssl, connection_timeout=timeout_s, network_timeout=timeout_s))
        if not self._call("GET /v2/health/ready", self.client.is_server_ready):
            raise DeployError(f"Triton server {self.url} is not ready (GET /v2/health/ready); wait for it to load "
                              "its models, or see its log")
        where = f"/v2/models/{self.model}" + (f"/versions/{self.version}" if self.version else "")
        if not self._call(f"GET {where}/ready", lambda: self.client.is_model_ready(self.model, self.version)):
            raise DeployError(f"Triton server {self.url}: model '{self.model}' is not ready (GET {where}/ready): "
                              "not in its model repository, or it failed to load (see the server's log)")
        meta = self._call(f"GET {where}", lambda: self.client.get_model_metadata(self.model, self.version))
        inputs, outputs = meta.get("inputs", []), [o["name"] for o in meta.get("outputs", [])]
        if len(inputs) != 1 or inputs[0].get("datatype") != FP32:
            raise DeployError(f"Triton server {self.url}: model '{self.model}' has inputs "
                              f"{[(i.get('name'), i.get('datatype')) for i in inputs]}; a medsim model has one "
                              f"{FP32} input — is it a medsim export?")
        self.input_name = str(inputs[0]["name"])
        self.output_names = list(output_names or outputs)
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise DeployError(f"Triton server {self.url}: model '{self.model}' has outputs {outputs}, not "
                              f"{missing} — does it serve this export? (re-export with --triton and restart it)")
        self.max_batch: int | None = self._max_batch()

    def _max_batch(self) -> int | None:
        """``max_batch_size`` from Triton's config endpoint (not part of KServe v2: ``None`` when absent)."""
        try:
            cfg = self.client.get_model_config(self.model, self.version)
        except Exception as e:  # noqa: BLE001 - an optional Triton extension
            logger.debug("Triton server %s: no model config (%s); batches are not capped", self.url, e)
            return None
        n = int(cfg.get("max_batch_size", 0) or 0)
        return n if n > 0 else None

    def _call(self, what: str, fn: Any) -> Any:
        """``fn()``, with any failure turned into a :class:`DeployError` naming the server and the reason."""
        try:
            return fn()
        except DeployError:
            raise
        except Exception as e:  # noqa: BLE001 - tritonclient, gevent and socket errors all mean the same here
            exc = getattr(self._http, "InferenceServerException", ())
            if exc and isinstance(e, exc):
                status = e.status()
                reason = f"{e.message()}" + (f" (HTTP {status})" if status else "")
            else:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            hint = ("; is the server running? (deploy/triton/launch.sh OUT/triton starts it)"
                    if isinstance(e, (ConnectionError, OSError, TimeoutError)) else "")
            raise DeployError(f"Triton server {self.url}: {what} failed: {reason}{hint}") from None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.client is None:
            raise DeployError(f"Triton server {self.url}: the runner was closed")
        x = np.ascontiguousarray(x, dtype=np.float32)
        http = self._http
        inp = http.InferInput(self.input_name, list(x.shape), FP32)
        inp.set_data_from_numpy(x, binary_data=self.binary)
        outs = [http.InferRequestedOutput(n, binary_data=self.binary) for n in self.output_names]
        where = f"POST /v2/models/{self.model}/infer (batch of {len(x)})"
        result = self._call(where, lambda: self.client.infer(self.model, [inp], model_version=self.version,
                                                             outputs=outs))
        got: dict[str, np.ndarray] = {}
        for n in self.output_names:
            a = result.as_numpy(n)
            if a is None or a.ndim == 0 or a.shape[0] != len(x):
                raise DeployError(f"Triton server {self.url}: {where} returned output '{n}' of shape "
                                  f"{None if a is None else a.shape}, expected {len(x)} rows")
            got[n] = np.asarray(a, dtype=np.float32)
        return got

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self.client = None


def triton_runner(backend: str, manifest: dict[str, Any], model_dir: str | os.PathLike, **kwargs: Any
                  ) -> TritonRunner:
    """The :class:`TritonRunner` of a ``"triton=URL"`` backend for an export: the model's name on the server is
    the manifest's ``triton.name`` (unless the URL names one), its outputs the manifest's ``output_names`` — what
    :class:`~medsim.deploy.EmbeddingEngine` runs with ``backend="triton=URL"``. ``kwargs``: ``binary``,
    ``timeout_s``."""
    url = triton_url(backend)
    if url is None:
        raise DeployError(f"backend '{backend}' is not a Triton backend (expected {TRITON_PREFIX}URL)")
    section = manifest.get("triton") or {}
    if parse_url(url).model is None and not section.get("name"):
        raise DeployError(f"{model_dir}: manifest.json has no triton section (exported without --triton), so the "
                          f"model's name on the server is unknown; give it in the URL: {url.rstrip('/')}"
                          "/v2/models/NAME")
    names = [str(n) for n in manifest.get("output_names", [])] or None
    return TritonRunner(url, section.get("name"), output_names=names, **kwargs)
