"""Bundle metadata validates offline against medsim's own copy of the MONAI meta schema.

``monai.bundle.verify_metadata`` downloads the schema named in the metadata's ``schema`` field to
``filepath`` unless ``filepath`` already exists (``monai.apps.utils.download_url`` then skips the
download). Handing it a copy of ``medsim/schemas/bundle_metadata.json`` therefore validates without
network access. On failure it raises ``ValueError`` whose ``__cause__`` is the
``jsonschema.ValidationError``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import monai.apps.utils
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "medsim" / "schemas" / "bundle_metadata.json"
METADATA_FILES = sorted(ROOT.glob("bundles/*/configs/metadata.json"))
ISIC_METADATA = ROOT / "bundles" / "isic_dsl" / "configs" / "metadata.json"
MONAI_SCHEMA_URL_PREFIX = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"


def _bundle_id(path: Path) -> str:
    return path.parents[1].name


@pytest.fixture
def schema_copy(tmp_path: Path) -> Path:
    """The shipped schema copied to tmp_path: verify_metadata finds it there and skips the download."""
    dst = tmp_path / "schema" / "meta_schema.json"
    dst.parent.mkdir()
    shutil.copyfile(SCHEMA, dst)
    return dst


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """Any download attempt fails loudly instead of going to the network."""

    def _refuse(url, *args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download {url}")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", _refuse)
    monkeypatch.setattr(monai.apps.utils, "urlopen", _refuse)


def _verify(meta_file: Path, schema_copy: Path) -> None:
    """verify_metadata in-process; the sha256 of the shipped schema also proves the file at filepath is ours."""
    verify_metadata(
        meta_file=str(meta_file),
        filepath=str(schema_copy),
        hash_val=hashlib.sha256(SCHEMA.read_bytes()).hexdigest(),
        hash_type="sha256",
    )


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(tmp_path: Path, meta: dict) -> Path:
    out = tmp_path / "metadata.json"
    out.write_text(json.dumps(meta, indent=2))
    return out


def test_bundles_found():
    assert ISIC_METADATA in METADATA_FILES


def test_schema_is_a_valid_json_schema():
    schema = _load(SCHEMA)
    validator_cls = jsonschema.validators.validator_for(schema)
    assert validator_cls is jsonschema.Draft7Validator
    validator_cls.check_schema(schema)


@pytest.mark.parametrize("meta_file", METADATA_FILES, ids=_bundle_id)
def test_schema_field_names_monai_meta_schema(meta_file: Path):
    url = _load(meta_file)["schema"]
    assert url.startswith(MONAI_SCHEMA_URL_PREFIX), url
    assert Path(url).name.startswith("meta_schema_") and url.endswith(".json"), url


@pytest.mark.parametrize("meta_file", METADATA_FILES, ids=_bundle_id)
def test_bundle_metadata_verifies_offline(meta_file: Path, schema_copy: Path):
    before = schema_copy.read_bytes()
    _verify(meta_file, schema_copy)
    assert schema_copy.read_bytes() == before == SCHEMA.read_bytes()  # no download replaced it


def _drop_monai_version(meta: dict) -> None:
    del meta["monai_version"]


def _num_channels_as_string(meta: dict) -> None:
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = "3"


def _drop_outputs(meta: dict) -> None:
    del meta["network_data_format"]["outputs"]


def _drop_input_num_channels(meta: dict) -> None:
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]


def _is_patch_data_as_string(meta: dict) -> None:
    meta["network_data_format"]["inputs"]["image"]["is_patch_data"] = "false"


def _drop_output_channel_def(meta: dict) -> None:
    for spec in meta["network_data_format"]["outputs"].values():
        del spec["channel_def"]
        break


def _empty_inputs(meta: dict) -> None:
    meta["network_data_format"]["inputs"] = {}


def _required_packages_as_list(meta: dict) -> None:
    meta["required_packages_version"] = ["medsim"]


BROKEN = {
    "missing-monai_version": _drop_monai_version,
    "num_channels-string": _num_channels_as_string,
    "missing-outputs": _drop_outputs,
    "missing-input-num_channels": _drop_input_num_channels,
    "is_patch_data-string": _is_patch_data_as_string,
    "missing-output-channel_def": _drop_output_channel_def,
    "empty-inputs": _empty_inputs,
    "required_packages_version-list": _required_packages_as_list,
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=list(BROKEN))
def test_broken_metadata_fails(breakage: str, tmp_path: Path, schema_copy: Path):
    meta = copy.deepcopy(_load(ISIC_METADATA))
    BROKEN[breakage](meta)
    broken_file = _write(tmp_path, meta)

    # plain jsonschema: the error type the schema produces
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance=meta, schema=_load(SCHEMA))

    # verify_metadata wraps that jsonschema.ValidationError in a ValueError
    with pytest.raises(ValueError) as excinfo:
        _verify(broken_file, schema_copy)
    assert isinstance(excinfo.value.__cause__, jsonschema.ValidationError)
    assert "Failed validating" in str(excinfo.value)
    assert schema_copy.read_bytes() == SCHEMA.read_bytes()


def test_extra_fields_are_allowed(tmp_path: Path, schema_copy: Path):
    meta = copy.deepcopy(_load(ISIC_METADATA))
    meta["medsim_extra"] = {"anything": [1, 2, 3]}
    meta["network_data_format"]["inputs"]["image"]["medsim_note"] = "extra tensor key"
    meta["network_data_format"]["medsim_note"] = "extra format key"
    _verify(_write(tmp_path, meta), schema_copy)


def test_variable_spatial_shape_is_allowed(tmp_path: Path, schema_copy: Path):
    meta = copy.deepcopy(_load(ISIC_METADATA))
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["2**n", "2**n"]
    meta["network_data_format"]["inputs"]["image"]["value_range"] = []
    _verify(_write(tmp_path, meta), schema_copy)


@pytest.mark.slow
def test_cli_verify_metadata_offline(schema_copy: Path):
    """The documented command line form exits 0 with the shipped schema and downloads nothing."""
    env = dict(os.environ)
    # should anything still try to download, point it at a closed local port so it fails fast
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        "bundles/isic_dsl/configs/metadata.json",
        "--filepath",
        str(schema_copy),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
    assert schema_copy.read_bytes() == SCHEMA.read_bytes()
