"""The Triton backend (medsim.deploy.triton_client) against a loopback fake of Triton's HTTP/REST API: a stdlib
http.server on 127.0.0.1 implementing the KServe v2 endpoints tritonclient.http uses, running the exported model
with onnxruntime and answering in the same JSON + binary format as Triton."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (bash scripts/install.sh --dev, or "
                                                "pip install 'medsim[triton]')")

ROOT = Path(__file__).resolve().parents[2]
_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>\d+))?(?P<rest>/ready|/config|/infer)?$")


class FakeTriton(ThreadingHTTPServer):
    """One model folder of a Triton repository written by medsim, served over KServe v2 HTTP on 127.0.0.1.

    ``fail``: ``None``, ``"server"`` (health not ready), ``"model"`` (model not ready) or ``"infer"`` (inference
    answers HTTP 500 with an error body, as Triton does). ``batches``: the batch sizes it was sent."""

    daemon_threads = True

    def __init__(self, folder: Path):
        import onnxruntime as ort

        from medsim.export.triton import parse_config

        self.name = folder.name
        self.config = parse_config(folder / "config.pbtxt")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "1" / "model.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        self.fail: str | None = None
        self.batches: list[int] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def metadata(self) -> dict:
        def tensor(t) -> dict:
            return {"name": t.name, "datatype": "FP32", "shape": [-1 if isinstance(d, str) or d is None else d
                                                                   for d in t.shape]}

        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [tensor(t) for t in self.session.get_inputs()],
                "outputs": [tensor(t) for t in self.session.get_outputs()]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # tritonclient keeps its connection open
    server: FakeTriton

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _model(self) -> re.Match | None:
        m = _ROUTE.match(self.path.split("?")[0])
        if m is None or m["name"] != self.server.name or (m["version"] not in (None, "1")):
            name = m["name"] if m else self.path
            self._error(400, f"Request for unknown model: '{name}' is not found")
            return None
        return m

    def do_GET(self) -> None:
        srv = self.server
        if self.path == "/v2/health/ready":
            return self._send(503 if srv.fail == "server" else 200)
        m = self._model()
        if m is None:
            return None
        if m["rest"] == "/ready":
            return self._send(400 if srv.fail == "model" else 200)
        if m["rest"] == "/config":
            return self._send(200, json.dumps({"name": srv.name,
                                               "max_batch_size": srv.config.max_batch_size}).encode())
        return self._send(200, json.dumps(srv.metadata()).encode())

    def do_POST(self) -> None:
        srv = self.server
        m = self._model()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if m is None:
            return None
        if m["rest"] != "/infer":
            return self._error(404, "Not Found")
        n = int(self.headers.get("Inference-Header-Content-Length") or len(body))
        request, blob = json.loads(body[:n]), body[n:]
        feeds, offset = {}, 0
        for t in request["inputs"]:
            assert t["datatype"] == "FP32"
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                a = np.frombuffer(blob[offset:offset + size], dtype=np.float32)
                offset += size
            else:
                a = np.asarray(t["data"], dtype=np.float32)
            feeds[t["name"]] = a.reshape(t["shape"])
        if srv.fail == "infer":
            return self._error(500, "onnxruntime execution failed: out of memory (fake)")
        srv.batches.append(len(next(iter(feeds.values()))))
        wanted = request.get("outputs") or [{"name": o.name} for o in srv.session.get_outputs()]
        results = srv.session.run([o["name"] for o in wanted], feeds)
        outs, blobs = [], []
        for o, r in zip(wanted, results):
            r = np.ascontiguousarray(r, dtype=np.float32)
            entry = {"name": o["name"], "datatype": "FP32", "shape": list(r.shape)}
            if (o.get("parameters") or {}).get("binary_data"):
                entry["parameters"] = {"binary_data_size": r.nbytes}
                blobs.append(r.tobytes())
            else:
                entry["data"] = r.ravel().tolist()
            outs.append(entry)
        header = json.dumps({"model_name": srv.name, "model_version": "1", "outputs": outs}).encode()
        extra = {"Inference-Header-Content-Length": len(header)} if blobs else {}
        self._send(200, header + b"".join(blobs), {"Content-Type": "application/octet-stream", **extra})


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def triton_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported with a Triton repository (ONNX, CPU instances, max_batch_size 4)."""
    from medsim.export.pipeline import export_run

    out = tmp_path_factory.mktemp("triton_client") / "export"
    export_run(tiny_run, out, opt_batch=2, max_batch=4, triton=True, triton_kind="cpu", triton_name="tiny")
    return out


@pytest.fixture
def server(triton_export):
    srv = FakeTriton(triton_export / "triton" / "tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def queries(tiny_run) -> list[str]:
    from medsim.data.splits import load_split

    return [str(it["image"]) for it in load_split(tiny_run / "split.json")["test"]][:7]


@pytest.fixture(scope="module")
def index_dir(triton_export, tiny_run, tmp_path_factory) -> Path:
    from medsim.deploy.tasks import build_index

    out = tmp_path_factory.mktemp("triton_index") / "index"
    build_index(triton_export, tiny_run / "split.json", out, split="training", kind="flat", backend="ort-cpu")
    return out


def _cli(capsys, *args) -> tuple[int, str, str]:
    from medsim.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- tests
def test_triton_embeddings_equal_the_local_engine(triton_export, server, queries):
    from medsim.deploy import EmbeddingEngine

    with EmbeddingEngine(triton_export, backend="ort-cpu") as local:
        ref = local.embed(queries)
    with EmbeddingEngine(triton_export, backend=f"triton={server.url}", batch_size=32) as remote:
        assert remote.backend == "triton" and remote.output_names == ["embedding", "attention"]
        got = remote.embed(queries)
    assert server.batches == [4, 3]  # the config's max_batch_size caps the engine's batches
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=0, err_msg=name)


def test_json_tensors_and_a_url_that_names_the_model(triton_export, server, queries):
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.triton_client import TritonRunner
    from medsim.runtime.runners import run_batched

    with EmbeddingEngine(triton_export, backend="ort-cpu") as local:
        x = np.stack([local.preprocess(q) for q in queries])
        ref = local.run(x)
    runner = TritonRunner(f"{server.url}/v2/models/tiny/versions/1", binary=False)
    try:
        assert (runner.model, runner.version, runner.max_batch) == ("tiny", "1", 4)
        got = run_batched(runner, x, 2)
    finally:
        runner.close()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=0, err_msg=name)


def test_cli_search_on_triton_returns_the_local_top_k(index_dir, server, queries, capsys):
    code, local, _ = _cli(capsys, "search", "--index", index_dir, "--k", 3, "--backend", "ort-cpu", *queries)
    assert code == 0
    code, remote, err = _cli(capsys, "search", "--index", index_dir, "--k", 3, "--backend", "triton", server.url,
                             *queries)
    assert code == 0, err
    assert remote == local and local.count("query ") == len(queries)
    assert server.batches  # the queries really went to the server


def test_server_down_is_a_clear_error(index_dir, queries, capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    code, _, err = _cli(capsys, "search", "--index", index_dir, "--backend", "triton", url, queries[0])
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: Triton server {url}: ") and "is the server running?" in err


@pytest.mark.parametrize("fail, match", [
    ("server", "is not ready (GET /v2/health/ready)"),
    ("model", "model 'tiny' is not ready (GET /v2/models/tiny/ready)"),
    ("infer", "POST /v2/models/tiny/infer (batch of 1) failed: onnxruntime execution failed: out of memory (fake) "
              "(HTTP 500)"),
])
def test_server_errors_are_clear_errors(index_dir, server, queries, capsys, fail, match):
    server.fail = fail
    code, _, err = _cli(capsys, "search", "--index", index_dir, "--backend", "triton", server.url, queries[0])
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: Triton server {server.url}") and match in err, err


def test_a_model_the_server_does_not_hold(triton_export, server):
    from medsim.deploy import DeployError, EmbeddingEngine

    with pytest.raises(DeployError, match="model 'other' is not ready"):
        EmbeddingEngine(triton_export, backend=f"triton={server.url}/v2/models/other")


@pytest.mark.parametrize("args, match", [
    (["--backend", "triton"], "triton needs the server's URL"),
    (["--backend", "triton", "ftp://host"], "is not an http"),
    (["--backend", "trt"], "'trt' is not one of auto, tensorrt, ort-cuda, ort-cpu, .*triton URL"),
])
def test_backend_option(index_dir, queries, capsys, args, match):
    code, _, err = _cli(capsys, "search", "--index", index_dir, queries[0], *args)
    assert code == 2 and re.search(match, err), err


def test_the_client_module_loads_no_torch():
    code = ("import sys, medsim.deploy.triton_client, tritonclient.http; "
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
