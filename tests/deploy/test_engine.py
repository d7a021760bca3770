"""medsim.deploy without torch/MONAI: preprocessing identical to MONAI's eval pipelines, EmbeddingEngine parity
with the PyTorch network, backend choice from the providers a created session really has, TensorRT plumbing
against fake ``tensorrt`` / cuda-python modules.

The tests themselves use torch and MONAI (as references); only the package under test must not."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsim.deploy import BackendUnavailable, DeployError, UnsupportedPreprocessing
from medsim.deploy.engine import CPU_EP, CUDA_EP, EmbeddingEngine
from medsim.deploy.preprocess import area_resize, load_manifest, preprocess, preprocess_with_size

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_dir(exported) -> Path:
    return Path(exported["onnx_path"]).parent


@pytest.fixture(scope="session")
def derm_images(sample_root) -> list[Path]:
    return sorted((sample_root / "derm" / "images").glob("*.png"))


def _manifest_for(kind: str, **args) -> dict:
    """A manifest whose preprocessing is described from the spec a run records (medsim.preprocessing.describe)."""
    from medsim.preprocessing import describe

    return {"preprocessing": describe({"_target_": f"medsim.data.transforms.{kind}_transforms", **args}),
            "input": {"name": "image"}}


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Non-square images in every PIL mode the readers meet (RGB, RGBA, L, LA, JPEG, 16-bit)."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    arrays = {"rgb.png": (rng.integers(0, 256, (37, 23, 3), dtype=np.uint8), None),
              "rgba.png": (rng.integers(0, 256, (30, 41, 4), dtype=np.uint8), None),
              "l.png": (rng.integers(0, 256, (19, 50), dtype=np.uint8), None),
              "la.png": (rng.integers(0, 256, (19, 50, 2), dtype=np.uint8), "LA"),
              "photo.jpg": (rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), None),
              "i16.png": (rng.integers(0, 65535, (40, 33), dtype=np.uint16), None)}
    out = {}
    for name, (arr, mode) in arrays.items():
        (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(d / name)
        out[name] = d / name
    return out


# ------------------------------------------------------------------------------------------------ import rule
def test_deploy_imports_neither_torch_nor_monai(model_dir, derm_images):
    code = ("import sys, medsim.deploy, medsim.deploy.engine, medsim.deploy.localizer, medsim.deploy.preprocess\n"
            "from medsim.deploy import EmbeddingEngine, Localizer\n"
            f"e = EmbeddingEngine({str(model_dir)!r})\n"
            f"out = e.embed([{str(derm_images[0])!r}], return_sizes=True)\n"
            "Localizer().localize(out['attention'][0], out['image_size'][0])\n"
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------- preprocess
def test_preprocess_matches_the_runs_monai_eval_preprocessing(loaded, model_dir, derm_images):
    manifest = load_manifest(model_dir)
    worst = 0.0
    for p in derm_images:
        ref = loaded.transform({"image": str(p)})["image"].numpy()
        got = preprocess(p, manifest)
        assert got.shape == ref.shape == (3, 32, 32) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("size", [(20, 24), (16, 16), (48, 40), (7, 5)])  # non-integer, integer, up, tiny
def test_rgb2d_matches_monai_for_every_mode_and_resize_factor(odd_images, size):
    from medsim.data.transforms import rgb2d_transforms

    t = rgb2d_transforms(spatial_size=size)
    m = _manifest_for("rgb2d", spatial_size=list(size))
    for name, p in odd_images.items():
        ref = t({"image": str(p)})["image"].numpy()
        got, hw = preprocess_with_size(p, m)
        assert got.shape == ref.shape == (3, *size), name
        assert np.abs(got - ref).max() <= 1e-5, (name, float(np.abs(got - ref).max()))
        with Image.open(p) as im:
            assert hw == (im.height, im.width)


def test_gray2d_matches_monai_on_dicom_and_png(sample_root, odd_images):
    import pydicom

    from medsim.data.transforms import gray2d_transforms

    files = sorted((sample_root / "dicom").rglob("*.dcm"))
    assert any(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
               for f in files)
    files += [odd_images["i16.png"], odd_images["rgba.png"], odd_images["la.png"]]
    for size in [(32, 32), (24, 20)]:
        t = gray2d_transforms(spatial_size=size)
        m = _manifest_for("gray2d", spatial_size=list(size))
        for f in files:
            ref = t({"image": str(f)})["image"].numpy()
            got = preprocess(f, m)
            assert got.shape == ref.shape == (1, *size), f.name
            assert np.abs(got - ref).max() <= 1e-5, (f.name, float(np.abs(got - ref).max()))


def test_array_and_pil_inputs_equal_the_file(odd_images, model_dir):
    m = load_manifest(model_dir)
    for name in ("rgb.png", "l.png", "rgba.png"):
        p = odd_images[name]
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im)
            assert np.array_equal(preprocess(arr, m), preprocess(p, m))
            assert np.array_equal(preprocess(im, m), preprocess(p, m))


def test_area_resize_is_adaptive_average_pooling():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).random((2, 13, 7)).astype(np.float32)
    for size in [(5, 3), (13, 7), (26, 14), (4, 9)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=size, mode="area")[0].numpy()
        assert np.abs(area_resize(x, size) - ref).max() < 1e-6


def test_preprocess_errors_name_the_problem(tmp_path, model_dir):
    m = load_manifest(model_dir)
    with pytest.raises(DeployError, match="nope.png: file not found"):
        preprocess(tmp_path / "nope.png", m)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DeployError, match="junk.png: not a readable image"):
        preprocess(tmp_path / "junk.png", m)
    with pytest.raises(DeployError, match="channel-first"):
        preprocess(np.zeros((3, 32, 32), np.uint8), m)
    ct = json.loads(json.dumps(m))
    ct["preprocessing"]["kind"] = "ct3d"
    with pytest.raises(UnsupportedPreprocessing, match="ct3d preprocessing has step") as e:  # a 2D recipe
        preprocess(np.zeros((8, 8, 3), np.uint8), ct)
    assert isinstance(e.value, NotImplementedError)
    odd = json.loads(json.dumps(m))
    odd["preprocessing"]["steps"].append("RandFlipd")
    with pytest.raises(UnsupportedPreprocessing, match="RandFlipd"):
        preprocess(np.zeros((8, 8, 3), np.uint8), odd)
    with pytest.raises(DeployError, match="manifest.json: not found"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------------------------------------- engine
def test_ort_cpu_embeddings_equal_pytorch(loaded, model_dir, derm_images):
    torch = pytest.importorskip("torch")
    images = derm_images[:11]
    ref_in = np.stack([loaded.transform({"image": str(p)})["image"].numpy() for p in images])
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in loaded.network(torch.from_numpy(ref_in)).items()}
    with EmbeddingEngine(model_dir, backend="ort-cpu", batch_size=4) as engine:  # 4 + 4 + 3: a ragged tail
        assert engine.backend == "ort-cpu" and engine.providers == [CPU_EP]
        out = engine.embed(images, return_sizes=True)
    assert out["embedding"].shape == (11, 32) and out["attention"].shape == (11, 1, 2, 2)
    assert np.array_equal(out["image_size"], np.full((11, 2), 32))
    diffs = {k: float(np.abs(out[k] - ref[k]).max()) for k in ("embedding", "attention")}
    assert all(d <= 1e-4 for d in diffs.values()), diffs
    print("parity vs PyTorch:", diffs)  # shown with -s


def test_auto_backend_on_this_host_and_basic_api(model_dir, derm_images):
    engine = EmbeddingEngine(model_dir)
    assert engine.backend in ("ort-cpu", "ort-cuda", "tensorrt")
    assert engine.output_names[:2] == ["embedding", "attention"] and engine.input_shape == (3, 32, 32)
    empty = engine.embed([])
    assert empty["embedding"].shape == (0, 32) and empty["attention"].shape == (0, 1, 2, 2)
    one = engine.embed(derm_images[0])  # a single path is a list of one
    assert one["embedding"].shape == (1, 32)
    assert np.allclose(np.linalg.norm(one["embedding"], axis=1), 1.0, atol=1e-5)
    with pytest.raises(DeployError, match=r"expected preprocessed images of shape \(N, 3, 32, 32\)"):
        engine.run(np.zeros((2, 3, 16, 16), np.float32))
    engine.close()
    with pytest.raises(DeployError, match="closed"):
        engine.run(np.zeros((1, 3, 32, 32), np.float32))


class _FakeSession:
    """Wraps a real CPU session but reports the providers a GPU-less onnxruntime-gpu would (or a working one)."""

    def __init__(self, real, providers):
        self._real, self._providers = real, providers

    def get_providers(self):
        return list(self._providers)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def fake_ort(monkeypatch):
    """onnxruntime claiming CUDA is available; sessions keep CUDA only when ``state['cuda_works']``."""
    import onnxruntime as ort

    real_cls = ort.InferenceSession
    state = {"cuda_works": False, "cuda_raises": False, "requested": []}

    def make(path, so=None, providers=None, **kw):
        state["requested"].append(providers)
        asked_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA_EP for p in providers or [])
        if asked_cuda and state["cuda_raises"]:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        real = real_cls(path, so, providers=[CPU_EP])
        return _FakeSession(real, [CUDA_EP, CPU_EP] if asked_cuda and state["cuda_works"] else [CPU_EP])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", CUDA_EP, CPU_EP])
    monkeypatch.setattr(ort, "InferenceSession", make)
    return state


def test_cuda_listed_but_not_kept_falls_back_to_cpu(fake_ort, model_dir, derm_images, caplog):
    with caplog.at_level("INFO", logger="medsim.deploy.engine"):
        engine = EmbeddingEngine(model_dir)  # auto
    assert fake_ort["requested"][0][0][0] == CUDA_EP  # CUDA was requested ...
    assert engine.backend == "ort-cpu" and engine.providers == [CPU_EP]  # ... but the session only has CPU
    assert "fell back" in caplog.text
    assert engine.embed(derm_images[:2])["embedding"].shape == (2, 32)
    with pytest.raises(BackendUnavailable, match=f"only has \\['{CPU_EP}'\\]"):
        EmbeddingEngine(model_dir, backend="ort-cuda")


def test_cuda_kept_is_reported_as_ort_cuda(fake_ort, model_dir):
    fake_ort["cuda_works"] = True
    assert EmbeddingEngine(model_dir).backend == "ort-cuda"
    assert EmbeddingEngine(model_dir, backend="ort-cuda").providers == [CUDA_EP, CPU_EP]
    assert EmbeddingEngine(model_dir, backend="ort-cpu").backend == "ort-cpu"


def test_cuda_session_failure_falls_back_in_auto_only(fake_ort, model_dir):
    fake_ort["cuda_raises"] = True
    assert EmbeddingEngine(model_dir).backend == "ort-cpu"
    with pytest.raises(BackendUnavailable, match="libcudnn"):
        EmbeddingEngine(model_dir, backend="ort-cuda")


def test_unavailable_backends_say_what_is_missing(model_dir, tmp_path, monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_EP])
    with pytest.raises(BackendUnavailable, match=f"no {CUDA_EP}.*onnxruntime-gpu"):
        EmbeddingEngine(model_dir, backend="ort-cuda")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(BackendUnavailable, match=r"model\.plan.*`tensorrt` Python package"):
        EmbeddingEngine(model_dir, backend="tensorrt")
    # a stray engine file without TensorRT: auto says why and runs on onnxruntime
    d = tmp_path / "m"
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    man = json.loads((d / "manifest.json").read_text())
    man["tensorrt"] = {"model": "model.plan", "precision": "fp16"}
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "model.plan").write_bytes(b"ENGINE")
    with caplog.at_level("INFO", logger="medsim.deploy.engine"):
        assert EmbeddingEngine(d).backend == "ort-cpu"
    assert "TensorRT skipped" in caplog.text and "tensorrt" in caplog.text
    with pytest.raises(DeployError, match="did you mean 'ort-cpu'"):
        EmbeddingEngine(model_dir, backend="ort_cpu")
    with pytest.raises(DeployError, match="batch_size"):
        EmbeddingEngine(model_dir, batch_size=0)
    with pytest.raises(DeployError, match="not a directory"):
        EmbeddingEngine(tmp_path / "absent")


# --------------------------------------------------------------------------------------- TensorRT, faked
def _fake_cuda_and_trt(onnx_path: Path, max_batch: int):
    """cuda-python and tensorrt stand-ins: "device" memory is host memory (ctypes buffers), the engine runs the
    ONNX model with onnxruntime on what was copied in. Exercises the buffer / shape / copy plumbing."""
    import onnxruntime as ort

    mem: dict[int, ctypes.Array] = {}
    calls: list[str] = []

    def malloc(n):
        buf = ctypes.create_string_buffer(n)
        mem[ctypes.addressof(buf)] = buf
        calls.append("malloc")
        return 0, ctypes.addressof(buf)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    cudart = types.SimpleNamespace(
        cudaGetDeviceCount=lambda: (0, 1), cudaSetDevice=lambda i: (0,), cudaStreamCreate=lambda: (0, 7),
        cudaStreamDestroy=lambda s: (0,), cudaStreamSynchronize=lambda s: (0,), cudaMalloc=malloc,
        cudaFree=lambda p: (mem.pop(p, None), 0)[1:], cudaMemcpyAsync=memcpy,
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))

    sess = ort.InferenceSession(str(onnx_path), providers=[CPU_EP])
    outs = {o.name: o.shape for o in sess.get_outputs()}
    sample = tuple(sess.get_inputs()[0].shape[1:])

    class Context:
        def __init__(self):
            self.shape, self.addr = None, {}

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= max_batch:
                return False
            self.shape = shape
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def get_tensor_shape(self, name):
            return (self.shape[0], *outs[name][1:])

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shape))
            x = np.frombuffer((ctypes.c_float * n).from_address(self.addr["image"]), np.float32).reshape(self.shape)
            for name, y in zip(outs, sess.run(list(outs), {"image": x.copy()})):
                ctypes.memmove(self.addr[name], np.ascontiguousarray(y).ctypes.data, y.nbytes)
            calls.append(f"execute {self.shape[0]}")
            return True

    class Engine:
        num_io_tensors = 1 + len(outs)

        def get_tensor_name(self, i):
            return ["image", *outs][i]

        def get_tensor_mode(self, name):
            return "IN" if name == "image" else "OUT"

        def get_tensor_profile_shape(self, name, profile):
            return (1, *sample), (2, *sample), (max_batch, *sample)

        def get_tensor_dtype(self, name):
            return "f32"

        def create_execution_context(self):
            return Context()

    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: Engine() if data == b"ENGINE" else None)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="IN", OUTPUT="OUT")
    trt.nptype = lambda dt: np.float32
    return trt, cudart, calls


def test_tensorrt_backend_plumbing_with_fakes(model_dir, derm_images, tmp_path, monkeypatch):
    import medsim.runtime.runners as runners

    d = tmp_path / "m"
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "model.plan").write_bytes(b"ENGINE")
    trt, cudart, calls = _fake_cuda_and_trt(d / "model.onnx", max_batch=4)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(runners, "import_cudart", lambda: cudart)
    images = derm_images[:10]
    # an engine file the manifest does not list (left by an earlier export) is never used
    assert EmbeddingEngine(d).backend == "ort-cpu" and not calls
    with pytest.raises(BackendUnavailable, match="listed in manifest.json"):
        EmbeddingEngine(d, backend="tensorrt")
    man = json.loads((d / "manifest.json").read_text())
    man["tensorrt"] = {"model": "model.plan", "precision": "fp32"}
    (d / "manifest.json").write_text(json.dumps(man))
    with EmbeddingEngine(d, batch_size=32) as engine:
        assert engine.backend == "tensorrt" and engine.batch_size == 4  # capped by the profile
        got = engine.embed(images)
    assert [c for c in calls if c.startswith("execute")] == ["execute 4", "execute 4", "execute 2"]
    ref = EmbeddingEngine(d, backend="ort-cpu").embed(images)
    for k in ("embedding", "attention"):
        assert np.abs(got[k] - ref[k]).max() < 1e-6
    (d / "model.plan").write_bytes(b"OTHER GPU")  # cannot be deserialized
    with pytest.raises(BackendUnavailable, match="cannot deserialize"):
        EmbeddingEngine(d, backend="tensorrt")
    assert EmbeddingEngine(d).backend == "ort-cpu"  # auto moves on


def test_export_engine_check_runs_the_deployed_trt_runner(model_dir, derm_images, tmp_path, monkeypatch):
    """`medsim export --trt` compares the engine with onnxruntime through medsim.runtime's TrtRunner — the runner
    EmbeddingEngine ships — so the check tests what deploys (fakes: TensorRT and CUDA copy through host memory)."""
    import medsim.export.tensorrt as export_trt
    import medsim.runtime.runners as runners
    from medsim.export.errors import TensorRTBuildError
    from medsim.export.onnx_export import ort_session, run_onnx

    trt, cudart, calls = _fake_cuda_and_trt(model_dir / "model.onnx", max_batch=4)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(runners, "import_cudart", lambda: cudart)
    monkeypatch.setattr(export_trt, "require_tensorrt", lambda: trt)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"ENGINE")
    with EmbeddingEngine(model_dir, backend="ort-cpu") as engine:
        x = np.stack([engine.preprocess(p) for p in derm_images[:7]])
    got = export_trt.run_engine(plan, x, batch=8)  # capped at the profile maximum, as in EmbeddingEngine
    assert [c for c in calls if c.startswith("execute")] == ["execute 4", "execute 3"]
    ref = run_onnx(ort_session(model_dir / "model.onnx"), x, batch=3)
    assert set(got) == set(ref)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() < 1e-6
    plan.write_bytes(b"OTHER GPU")
    with pytest.raises(TensorRTBuildError, match="cannot deserialize"):
        export_trt.run_engine(plan, x, batch=4)


def test_int8_precision_is_not_silently_swapped_for_a_tensorrt_plan(model_dir):
    """--precision int8 is the onnxruntime INT8 model; asking for it on the TensorRT backend (which would run
    whatever plan the manifest lists) is refused with the command that builds a TensorRT INT8 plan."""
    from medsim.deploy.engine import open_engine

    with pytest.raises(DeployError, match=r"--trt --precision int8"):
        open_engine(model_dir, backend="tensorrt", precision="int8")
