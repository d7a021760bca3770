"""Every bundle's metadata.json#network_data_format agrees with what its config builds: the input size is the eval
preprocessing's output size (``image_size``), and each described output has the shape the network really returns
(embedding size = ``embedding_dim``, attention grid, logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_network_data_format_matches_the_config(bundle: Path, sample_root):
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files, _metadata_file

    fmt = json.loads(_metadata_file(bundle).read_text())["network_data_format"]
    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(bundle, None)))
    n_classes = fmt["outputs"]["logits"]["num_channels"] if "logits" in fmt["outputs"] else 4
    parser["classes"] = [str(i) for i in range(n_classes)]
    parser["device"] = "$torch.device('cpu')"
    spatial = fmt["inputs"]["image"]["spatial_shape"]
    size = parser.get_parsed_content("image_size")
    assert list(spatial) == ([size] * len(spatial) if isinstance(size, int) else list(size))
    # a 2-D bundle reads a dermoscopy image, a 3-D one the sample's CT volume
    image = next((sample_root / "derm" / "images").glob("*.png")) if len(spatial) == 2 else \
        sample_root / "ct" / "ct.nii.gz"
    x = parser.get_parsed_content("eval#preprocessing")({"image": str(image)})["image"]
    assert list(x.shape) == [fmt["inputs"]["image"]["num_channels"], *spatial]
    net = parser.get_parsed_content("network").eval()
    with torch.no_grad():
        out = net(x[None].float())
    for name, spec in fmt["outputs"].items():
        want = [spec["num_channels"], *spec["spatial_shape"]] if spec["spatial_shape"] else [spec["num_channels"]]
        assert list(out[name].shape[1:]) == want, name
    assert fmt["outputs"]["embedding"]["num_channels"] == net.embedding_dim
