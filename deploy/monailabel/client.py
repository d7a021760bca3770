"""A small standard-library client for medsim's MONAI Label app, and a launcher for a loopback server.

Used by the server test (``tests/deploy/test_monailabel_server.py``) and the latency benchmark
(``benchmarks/monailabel_latency.py``); usable from any script::

    from client import LabelClient
    c = LabelClient("http://127.0.0.1:8000")
    c.similar_cases("ISIC_0024306", k=5)["cases"]
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent


class LabelError(RuntimeError):
    """An HTTP error answer: ``status`` and the server's ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class LabelClient:
    """``GET /info/``, ``POST /infer/{task}``, ``POST /activelearning/{strategy}``, ``PUT /datastore/label``,
    ``POST /train/{model}`` of a MONAI Label server."""

    def __init__(self, url: str, timeout: float = 120.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    # ---------------------------------------------------------------------------------------------- requests
    def request(self, method: str, path: str, query: dict[str, Any] | None = None, *,
                fields: dict[str, str] | None = None, files: dict[str, tuple[str, bytes]] | None = None,
                body: Any = None) -> tuple[bytes, str]:
        """One request → (body, content type); raises :class:`LabelError` for 4xx/5xx."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {}
        data = None
        if fields is not None or files is not None:
            data, ctype = _multipart(fields or {}, files or {})
            headers["Content-Type"] = ctype
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace")
            raise LabelError(e.code, str(detail)) from None

    def json(self, method: str, path: str, query: dict[str, Any] | None = None, **kw: Any) -> Any:
        return json.loads(self.request(method, path, query, **kw)[0])

    def info(self) -> dict[str, Any]:
        return self.json("GET", "/info/")

    def infer(self, task: str, image: str | None = None, *, params: dict[str, Any] | None = None,
              upload: str | os.PathLike | None = None, output: str = "json") -> tuple[bytes, str]:
        """``image``: a datastore image id; ``upload``: a file sent instead."""
        query = {"output": output, **({"image": image} if image else {})}
        files = {"file": (Path(upload).name, Path(upload).read_bytes())} if upload else None
        return self.request("POST", f"/infer/{task}", query, fields={"params": json.dumps(params or {})},
                            files=files)

    def similar_cases(self, image: str | None = None, k: int = 5, **kw: Any) -> dict[str, Any]:
        body, _ = self.infer("similar_cases", image, params={"k": k, **kw.pop("params", {})}, **kw)
        return json.loads(body)["similar_cases"]

    def localize(self, image: str | None = None, **kw: Any) -> tuple[dict[str, Any], bytes]:
        """(the result JSON, the label image file's bytes)."""
        params = json.loads(self.infer("localize", image, output="json", **kw)[0])
        label, _ = self.infer("localize", image, output="image", **kw)
        return params, label

    def next_sample(self, strategy: str = "medsim", **params: Any) -> dict[str, Any]:
        return self.json("POST", f"/activelearning/{strategy}", body=params)

    def save_label(self, image: str, label_file: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.request("PUT", "/datastore/label", {"image": image, "tag": "final"},
                                       fields={"params": json.dumps(info)},
                                       files={"label": (Path(label_file).name, Path(label_file).read_bytes())})[0])

    def train(self, model: str = "medsim", **params: Any) -> Any:
        return self.json("POST", f"/train/{model}", body=params)

    def wait_train(self, timeout: float = 600.0) -> dict[str, Any]:
        """Poll ``GET /train/`` until the last training task has ended (DONE, ERROR or STOPPED); its record."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = self.json("GET", "/train/")
            if st and st.get("status") in ("DONE", "ERROR", "STOPPED"):  # else SUBMITTED / RUNNING
                return st
            time.sleep(1.0)
        raise TimeoutError(f"training still running after {timeout:.0f} s")


def concurrent_similar_cases(url: str, ids: list[str], expected: dict[str, list[str]], *, clients: int = 8,
                             requests: int = 20, k: int = 5) -> dict[str, Any]:
    """``clients`` threads, each with its own :class:`LabelClient`, send ``requests`` similar-case requests (no
    thumbnails) for random ``ids`` at once; every answer's case ids are checked against ``expected[id]``.

    Returns ``{"latencies_ms": [...], "errors": ["id: what was wrong", ...], "wall_s": seconds}``."""
    import random
    import threading

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        c, rng = LabelClient(url), random.Random(seed)
        for _ in range(requests):
            i = rng.choice(ids)
            t0 = time.perf_counter()
            try:
                got = [h["id"] for h in c.similar_cases(i, k=k, params={"thumbnails": 0})["cases"]]
                problem = None if got == expected[i] else f"{i}: {got} != {expected[i]}"
            except (LabelError, OSError, ValueError, KeyError) as e:
                problem = f"{i}: {type(e).__name__}: {e}"
            with lock:
                lat.append((time.perf_counter() - t0) * 1000.0)
                if problem:
                    errors.append(problem)

    threads = [threading.Thread(target=client, args=(s + 1,)) for s in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies_ms": lat, "errors": errors, "wall_s": time.perf_counter() - t0}


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(studies: str | os.PathLike, conf: dict[str, str], *, venv: str | os.PathLike | None = None,
          port: int | None = None, log: str | os.PathLike | None = None, start_timeout: float = 180.0,
          env: dict[str, str] | None = None) -> Iterator[LabelClient]:
    """Run ``deploy/monailabel/serve.sh STUDIES --conf ...`` on a free loopback port until the block ends; yields a
    client once ``/info/`` answers (raises RuntimeError with the server's log tail when it does not start)."""
    port = port or free_port()
    args = ["bash", str(HERE / "serve.sh"), str(studies), "--port", str(port)]
    for k, v in conf.items():
        args += ["--conf", k, str(v)]
    run_env = {**os.environ, **(env or {})}
    if venv:
        run_env["MEDSIM_LABEL_VENV"] = str(venv)
    log_path = Path(log) if log else Path(studies).parent / f"monailabel-{port}.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
    client = LabelClient(f"http://127.0.0.1:{port}")
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                client.info()
                break
            except (OSError, LabelError):
                if time.time() - t0 > start_timeout:
                    raise RuntimeError(f"no answer on port {port} after {start_timeout:.0f} s:\n"
                                       f"{log_path.read_text(errors='replace')[-4000:]}") from None
                time.sleep(0.5)
        client.log = log_path  # type: ignore[attr-defined]
        yield client
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
