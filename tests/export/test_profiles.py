"""Export profiles (export/profiles/*.json, ``medsim export --profile``) and the Triton launcher (deploy/triton/).

The profile tests check what an export built with a profile *is*: the manifest record, the ONNX outputs against a
plain export (onnxruntime), the INT8 model against ``--precision int8``, the TensorRT failure against ``--trt``'s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medsim.cli import export as export_command
from medsim.cli import main
from medsim.export.profiles import (DEFAULTS, OPTIONS, SHIPPED_DIR, ExportProfile, ProfileError, available_profiles,
                                    load_profile, parse_profile)

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "deploy" / "triton" / "launch.sh"

#: what each shipped profile must set (every field, so a shipped profile reads on its own)
SHIPPED = {
    "cpu-fp32": {"precision": "fp32", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": False, "quantize": None,
                 "triton": False},
    "cpu-int8": {"precision": "int8", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": False,
                 "quantize": "static", "calib_split": "training", "max_calibration": 256, "triton": False},
    "trt-fp16": {"precision": "fp16", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": True, "quantize": None,
                 "triton": False},
    "trt-int8": {"precision": "int8", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": True, "quantize": None,
                 "calib_split": "training", "max_calibration": 256, "triton": False},
    "triton-gpu": {"precision": "fp32", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": False,
                   "quantize": None, "triton": True, "triton_kind": "gpu"},
}


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_env_profiles(monkeypatch):
    monkeypatch.delenv("MEDSIM_EXPORT_PROFILES", raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def ort_outputs(model: Path, x: np.ndarray) -> list[np.ndarray]:
    from medsim.export.onnx_export import ort_session

    return ort_session(model).run(None, {"image": x})


# ------------------------------------------------------------------------------------------- loading, checking
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_loads_with_its_settings(name):
    p = load_profile(name)
    assert isinstance(p, ExportProfile) and p.path == SHIPPED_DIR / f"{name}.json" and p.name == name
    assert p.settings == SHIPPED[name] and p.description
    assert len(p.sha256) == 64


def test_the_profile_settings_are_the_export_options():
    """Every setting is an option of `medsim export` (so --flag can override it) and a keyword of export_run."""
    import inspect

    from medsim.export.pipeline import export_run

    params = {p.name: p for p in export_command.params}
    assert set(DEFAULTS) == set(OPTIONS) and set(DEFAULTS) <= set(inspect.signature(export_run).parameters)
    for key, flag in OPTIONS.items():
        assert flag in params[key].opts and params[key].default == DEFAULTS[key], key
    assert set(available_profiles()) >= set(SHIPPED)


@pytest.mark.parametrize("text, field, message", [
    ('{"precison": "fp16"}', "precison", "did you mean 'precision'"),
    ('{"opset": "17"}', "opset", 'expected an integer, got "17" (a string)'),
    ('{"opset": true}', "opset", "expected an integer, got true (a boolean)"),
    ('{"opset": 13}', "opset", "must be >= 17, got 13"),
    ('{"precision": "fp8"}', "precision", "unknown precision 'fp8'"),
    ('{"trt": "yes"}', "trt", "expected true or false"),
    ('{"batch": {"opt": 8, "max": -4}}', "batch.max", "must be >= 1, got -4"),
    ('{"batch": {"opt": -1, "max": 4}}', "batch.opt", "must be >= 1, got -1"),
    ('{"batch": {"opt": 16, "max": 8}}', "batch", "needs min <= opt <= max, got opt=16 > max=8"),
    ('{"batch": {"min": 2, "opt": 8, "max": 32}}', "batch.min", "must be 1"),
    ('{"batch": {"opt": 8}}', "batch", "missing max"),
    ('{"batch": {"opt": 8, "max": 32, "maximum": 64}}', "batch.maximum", "unknown"),
    ('{"batch": [1, 8, 32]}', "batch", "expected an object"),
    ('{"calibration": {"split": "train"}}', "calibration.split", "did you mean 'training'"),
    ('{"calibration": {"images": 0}}', "calibration.images", "must be >= 1, got 0"),
    ('{"quantize": "int8"}', "quantize", "unknown quantize 'int8'"),
    ('{"triton_kind": 1}', "triton_kind", "expected one of gpu, cpu"),
    ('{"schema": 2}', "schema", "reads profile schema 1"),
    ('{"description": 3}', "description", "expected a string"),
])
def test_bad_field_is_refused_naming_file_and_field(tmp_path, text, field, message):
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: field '{field}': ") and message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"precision": "fp16"}', "its fields do not fit together: --precision fp16 needs --trt"),
    ('{"trt": true, "triton": true, "triton_kind": "cpu"}', "cannot serve a TensorRT engine"),
    ('{"opset": 17, "opset": 18}', "field 'opset' is given twice"),
    ('{"opset": NaN}', "NaN is not a valid value"),
    ('{"opset": 17,}', "not valid JSON ("),  # the reason's wording is Python's
    ('["fp16"]', 'a profile is a JSON object {"field": value, ...}, got ["fp16"] (an array)'),
])
def test_bad_profile_as_a_whole_is_refused(tmp_path, text, message):
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(ProfileError, match=re.escape(f"{path}: ")) as e:
        load_profile(path)
    assert message in str(e.value)


def test_lookup_by_name_env_folder_and_path(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    write(mine / "cpu-fp32.json", '{"batch": {"opt": 2, "max": 4}}')  # shadows the shipped one
    write(mine / "edge.json", '{"precision": "int8"}')
    monkeypatch.setenv("MEDSIM_EXPORT_PROFILES", str(mine))
    assert load_profile("cpu-fp32").settings == {"opt_batch": 2, "max_batch": 4}
    assert load_profile("trt-fp16").path == SHIPPED_DIR / "trt-fp16.json"  # the shipped folder is still searched
    assert load_profile(mine / "edge.json").settings == {"precision": "int8"}
    with pytest.raises(ProfileError, match="no export profile 'cpu-fp33'.*available: cpu-fp32, cpu-int8, edge, "
                                           r"triton-gpu, trt-fp16, trt-int8 \(did you mean 'cpu-fp32'\?\)"):
        load_profile("cpu-fp33")
    with pytest.raises(ProfileError, match="missing.json: export profile not found"):
        load_profile(tmp_path / "missing.json")
    monkeypatch.setenv("MEDSIM_EXPORT_PROFILES", str(tmp_path / "nowhere"))
    with pytest.raises(ProfileError, match="MEDSIM_EXPORT_PROFILES=.*nowhere: not a folder"):
        load_profile("cpu-fp32")


def test_resolve_explicit_beats_profile_beats_default():
    p = load_profile("trt-fp16")
    given = dict(DEFAULTS, opt_batch=4, precision="fp32", quantize="dynamic")
    got = p.resolve(given, explicit={"opt_batch", "precision"})
    # explicit: opt_batch 4, precision fp32; from the profile: trt, max_batch 32, quantize None (it sets null);
    # the profile leaves triton_kind alone: the option's value stays
    assert got == dict(DEFAULTS, opt_batch=4, precision="fp32", trt=True, quantize=None)
    rec = p.record(got, {"opt_batch", "precision"})
    assert rec["command_line"] == ["--precision", "--opt-batch"]
    assert parse_profile(rec["settings"])[1] == got  # the record is itself a valid profile of the same settings


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_bad_profile_exits_2_with_one_line(tiny_run, tmp_path, capsys):
    path = write(tmp_path / "neg.json", '{"batch": {"opt": 8, "max": -32}}')
    out = tmp_path / "out"
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--profile", str(path)], capsys)
    assert code == 2 and stdout == ""
    assert err == f"error: {path}: field 'batch.max': must be >= 1, got -32\n"
    assert not out.exists()
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--profile", "nonesuch"], capsys)
    assert code == 2 and err.startswith("error: no export profile 'nonesuch'") and "Traceback" not in err


def test_cli_list_profiles(tmp_path, monkeypatch, capsys):
    code, stdout, err = run(["export", "--list-profiles"], capsys)
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    assert set(rows) >= set(SHIPPED)
    assert rows["trt-int8"][:9] == ["trt-int8", "int8", "yes", "-", "1/8/32", "17", "training", "x256", "-"]
    assert rows["triton-gpu"][:8] == ["triton-gpu", "fp32", "no", "-", "1/8/32", "17", "-", "gpu"]
    mine = tmp_path / "mine"
    mine.mkdir()
    write(mine / "broken.json", '{"opset": 11}')
    monkeypatch.setenv("MEDSIM_EXPORT_PROFILES", str(mine))
    code, stdout, err = run(["export", "--list-profiles"], capsys)
    assert code == 2 and "cpu-fp32" in stdout and "broken" not in stdout
    assert err == f"error: {mine / 'broken.json'}: field 'opset': must be >= 17, got 11\n"


def test_cli_profile_cpu_fp32_equals_a_plain_export(tiny_run, tmp_path, capsys):
    code, stdout, err = run(["export", str(tiny_run), "--out", str(tmp_path / "p"), "--profile", "cpu-fp32"], capsys)
    assert code == 0, err
    assert "profile   cpu-fp32  (cpu-fp32.json)" in stdout
    code, _, err = run(["export", str(tiny_run), "--out", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    mp, m0 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("p", "plain"))
    rec = mp.pop("export_profile")
    assert "export_profile" not in m0
    assert rec["name"] == "cpu-fp32" and rec["file"] == "cpu-fp32.json" and rec["command_line"] == []
    import hashlib

    assert rec["sha256"] == hashlib.sha256((SHIPPED_DIR / "cpu-fp32.json").read_bytes()).hexdigest()
    assert rec["settings"] == {"schema": 1, "precision": "fp32", "opset": 17, "batch": {"min": 1, "opt": 8, "max": 32},
                               "trt": False, "quantize": None, "calibration": {"split": "training", "images": 256},
                               "triton": False, "triton_kind": "gpu"}
    for m in (mp, m0):
        for k in ("created", "updated", "cpu_timing"):  # cpu_timing: images/s measured at export (OpenVINO hosts)
            m.pop(k, None)
    assert mp == m0  # same parity record (batches 1 and 8), same shapes, same source checkpoint
    assert mp["parity"]["batch_sizes"] == [1, 8]
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    for a, b in zip(ort_outputs(tmp_path / "p" / "model.onnx", x), ort_outputs(tmp_path / "plain" / "model.onnx", x)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_cli_explicit_options_beat_the_profile(tiny_run, tmp_path, capsys, no_tensorrt):
    """trt-fp16 asks for TensorRT fp16 at 1/8/32; --no-trt --precision fp32 --opt-batch 2 --max-batch 4 win."""
    out = tmp_path / "out"
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--profile", "trt-fp16", "--no-trt",
                             "--precision", "fp32", "--opt-batch", "2", "--max-batch", "4"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    rec = m["export_profile"]
    assert rec["name"] == "trt-fp16"
    assert rec["command_line"] == ["--precision", "--opt-batch", "--max-batch", "--trt"]
    assert (rec["settings"]["trt"], rec["settings"]["precision"], rec["settings"]["batch"]) == (
        False, "fp32", {"min": 1, "opt": 2, "max": 4})
    assert m["parity"]["batch_sizes"] == [1, 2] and "tensorrt" not in m and not (out / "model.plan").exists()
    assert "from the command line: --precision, --opt-batch, --max-batch, --trt" in stdout

    # a profile's own batch and Triton fields take effect; an explicit --max-batch still wins over them
    prof = write(tmp_path / "small.json", '{"batch": {"opt": 2, "max": 4}, "triton": true, "triton_kind": "cpu"}')
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--profile", str(prof)], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["batch_sizes"] == [1, 2]
    assert (m["triton"]["max_batch_size"], m["triton"]["kind"]) == (4, "KIND_CPU")
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--profile", str(prof), "--max-batch", "6"],
                       capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["triton"]["max_batch_size"] == 6 and m["export_profile"]["command_line"] == ["--max-batch"]
    assert "max_batch_size: 6" in (out / "triton" / "tiny" / "config.pbtxt").read_text()

    # cpu-int8 without its INT8 model: --quantize none and --precision fp32 undo both of its INT8 fields
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--profile", "cpu-int8", "--precision", "fp32",
                        "--quantize", "none", "--opt-batch", "2"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert "int8" not in m and not (out / "model.int8.onnx").exists()
    assert m["export_profile"]["settings"]["quantize"] is None

    # a later export into the folder without a profile says so: the section describes the last call
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--no-onnx", "--quantize", "dynamic"], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["export_profile"] is None


def test_cli_profile_cpu_int8_equals_precision_int8(tiny_run, tmp_path, capsys):
    code, stdout, err = run(["export", str(tiny_run), "--out", str(tmp_path / "p"), "--profile", "cpu-int8"], capsys)
    assert code == 0, err
    code, _, err = run(["export", str(tiny_run), "--out", str(tmp_path / "plain"), "--precision", "int8"], capsys)
    assert code == 0, err
    mp, m0 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("p", "plain"))
    assert mp["int8"] == m0["int8"]  # mode, calibration split and count, R@1 fp32/int8 measured the same
    assert mp["int8"]["mode"] == "static" and mp["int8"]["calibration"] == {"split": "training", "images": 34}
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "p" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    q_p, q_0 = (ort_outputs(tmp_path / d / "model.int8.onnx", x) for d in ("p", "plain"))
    for a, b in zip(q_p, q_0):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    f32 = ort_outputs(tmp_path / "p" / "model.onnx", x)
    assert 0 < np.abs(q_p[0] - f32[0]).max() < 0.5  # quantized: close to fp32, not equal to it


def test_cli_profile_trt_fails_exactly_as_trt(tiny_run, tmp_path, capsys, no_tensorrt):
    out_p, out_t = tmp_path / "p", tmp_path / "t"
    code_p, stdout_p, err_p = run(["export", str(tiny_run), "--out", str(out_p), "--profile", "trt-fp16"], capsys)
    code_t, _, err_t = run(["export", str(tiny_run), "--out", str(out_t), "--trt", "--precision", "fp16"], capsys)
    assert code_p == code_t == 2 and stdout_p == ""
    assert err_p.startswith("error: TensorRT export is not possible here") and err_p.count("\n") == 1
    assert err_p == err_t.replace(str(out_t), str(out_p))
    assert not out_p.exists() and not out_t.exists()


# -------------------------------------------------------------------------------------------- deploy/triton
def test_triton_readme_config_is_what_triton_py_writes():
    from medsim.export.triton import triton_config_text

    text = (ROOT / "deploy" / "triton" / "README.md").read_text()
    block = re.search(r"```pbtxt\n(.*?)```", text, re.S).group(1)
    assert block == triton_config_text(
        "isic_dsl", "onnxruntime_onnx", [{"name": "image", "dims": [3, 224, 224]}],
        [{"name": "embedding", "dims": [128]}, {"name": "attention", "dims": [1, 7, 7]}], max_batch_size=32,
        preferred_batch_sizes=[8, 32], max_queue_delay_us=100, instance_count=1, kind="KIND_GPU")


@pytest.fixture
def bare_path(tmp_path) -> tuple[Path, dict]:
    """A bin folder holding only the tools launch.sh uses (no docker, no tritonserver) and the env to run in."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "env", "sed", "grep", "dirname", "basename", "xargs", "paste"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (bin_ / tool).symlink_to(found)
    return bin_, {"PATH": str(bin_), "HOME": str(tmp_path)}


@pytest.fixture
def repo(exported, tmp_path) -> Path:
    from medsim.export import write_triton_repository

    write_triton_repository(Path(exported["onnx_path"]).parent, tmp_path / "export" / "triton", name="m",
                            kind="KIND_GPU")
    return tmp_path / "export" / "triton"


def launch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(LAUNCH), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def fake(bin_: Path, name: str, log: Path) -> Path:
    """An executable ``name`` that writes its arguments (one a line) to ``log``."""
    exe = bin_ / name
    exe.write_text(f'#!{shutil.which("bash")}\nprintf "%s\\n" "$@" > {shlex.quote(str(log))}\n')
    exe.chmod(0o755)
    return exe


def test_launch_without_docker_or_tritonserver_says_so(repo, bare_path):
    _, env = bare_path
    r = launch(["--dry-run", str(repo)], env)
    assert r.returncode == 2 and r.stdout == ""
    assert "neither a 'tritonserver' binary nor 'docker' is on PATH" in r.stderr
    r = launch([str(repo.parent / "nope")], env)
    assert r.returncode == 2 and "nope: not a folder" in r.stderr
    (repo.parent / "empty").mkdir()
    r = launch([str(repo.parent / "empty")], env)
    assert r.returncode == 2 and "no MODEL/config.pbtxt in it" in r.stderr


def test_launch_local_tritonserver_binds_to_loopback(repo, bare_path, tmp_path):
    bin_, env = bare_path
    log = tmp_path / "args.txt"
    exe = fake(bin_, "tritonserver", log)
    r = launch(["--dry-run", str(repo.parent)], env)  # the export folder: its triton/ is served
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [str(exe), f"--model-repository={repo}", "--http-address=127.0.0.1",
                                     "--grpc-address=127.0.0.1", "--http-port=8000", "--grpc-port=8001",
                                     "--metrics-port=8002"]
    assert not log.exists()  # a dry run runs nothing
    r = launch(["--public", "--http-port", "9000", str(repo)], env)  # for real: the fake server logs its arguments
    assert r.returncode == 0, r.stderr
    assert log.read_text().split() == [f"--model-repository={repo}", "--http-address=0.0.0.0",
                                       "--grpc-address=0.0.0.0", "--http-port=9000", "--grpc-port=8001",
                                       "--metrics-port=8002"]
    r = launch(["--http-port", "0", str(repo)], env)
    assert r.returncode == 2 and "port '0' is not in 1..65535" in r.stderr


def test_launch_docker_publishes_on_loopback(repo, bare_path, tmp_path):
    bin_, env = bare_path
    fake(bin_, "docker", tmp_path / "docker.txt")
    r = launch(["--dry-run", str(repo)], {**env, "MEDSIM_TRITON_TAG": "24.08"})
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == ["docker", "run", "--rm", "--shm-size=1g", "--gpus=all",
                                     "-p", "127.0.0.1:8000:8000", "-p", "127.0.0.1:8001:8001", "-p",
                                     "127.0.0.1:8002:8002", "-v", f"{repo}:/models:ro",
                                     "nvcr.io/nvidia/tritonserver:24.08-py3", "tritonserver",
                                     "--model-repository=/models"]
    r = launch(["--dry-run", "--cpu", "--public", "--tag", "25.01", str(repo)], env)
    cmd = shlex.split(r.stdout)
    assert r.returncode == 0 and "--gpus=all" not in cmd and "-p" in cmd and "8000:8000" in cmd
    assert "nvcr.io/nvidia/tritonserver:25.01-py3" in cmd
    assert "--cpu, but m ask for a GPU; re-export with --triton-kind cpu" in r.stderr  # the repo is KIND_GPU
    assert os.access(LAUNCH, os.X_OK)
