"""Bundles are layered the MONAI way (a config-file list, nested-id overrides) and a bundle that is not DSL carries
no DSL knobs and runs none of DSL's machinery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsim.engines.workflow import _bundle_files, bundle_variants

ROOT = Path(__file__).resolve().parents[2]
DSL_KNOBS = {"mode", "k", "max_k", "patience", "split_threshold", "split_quantile", "split_grace",
             "split_reset_optimizer", "split_min_delta", "min_neurons", "recluster_every", "finetune_epochs",
             "subspaces"}
NOT_DSL = ["isic_abe", "derm_lossattn", "derm_gated"]
SSL = ["derm_ssl", "cxr_medaug"]


def _parser(bundle: str, variant: str | None = None, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(ROOT / "bundles" / bundle, variant)))
    parser.update({"device": "$torch.device('cpu')", **overrides})
    return parser


@pytest.mark.parametrize("bundle", NOT_DSL + SSL)
def test_a_bundle_that_is_not_dsl_names_no_dsl_knob(bundle):
    own = json.loads((ROOT / "bundles" / bundle / "configs" / "train.json").read_text())
    assert not DSL_KNOBS & set(own) and "base_bundle" not in own
    if "method" in own:  # cxr_medaug inherits derm_ssl's
        assert own["method"]["handlers"] == [] and own["method"]["assignment"] is None


@pytest.mark.parametrize("bundle", ["derm_ssl"])  # cxr_medaug needs a CSV dataset: test_cxr_medaug_bundle.py
def test_an_ssl_bundle_trains_its_wrapper_on_views_with_no_subspace_part(bundle, tmp_path):
    from monai.engines import SupervisedTrainer

    from medsim.engines import SubspaceHandler
    from medsim.ssl import JointEmbedding

    parser = _parser(bundle, output_dir=str(tmp_path), image_size=32, widen_factor=0.25)
    trainer = parser.get_parsed_content("train#trainer")
    assert type(trainer) is SupervisedTrainer and isinstance(trainer.network, JointEmbedding)
    assert trainer.network.encoder is parser.get_parsed_content("network")
    assert not any(isinstance(h, SubspaceHandler) for h in parser.get_parsed_content("train#handlers"))
    assert parser.get_parsed_content("train#sampler") is None


@pytest.mark.parametrize("bundle", NOT_DSL)
def test_a_bundle_that_is_not_dsl_builds_no_subspace_part(bundle, tmp_path):
    from monai.engines import SupervisedTrainer

    from medsim.engines import BatchLoss, SubspaceHandler, SubspaceRoutingLoss

    parser = _parser(bundle, output_dir=str(tmp_path), image_size=32, widen_factor=0.25, global_size=32,
                     local_size=16)
    trainer = parser.get_parsed_content("train#trainer")
    assert type(trainer) is SupervisedTrainer
    assert isinstance(trainer.loss_function, BatchLoss) and not isinstance(trainer.loss_function, SubspaceRoutingLoss)
    handlers = parser.get_parsed_content("train#handlers")
    assert not any(isinstance(h, SubspaceHandler) for h in handlers)
    assert parser.get_parsed_content("train#sampler").assignment is None
    objects = parser.get_parsed_content("train#checkpointer").objects
    assert set(objects) == {"network", "optimizer", "loss", "record", "rng"}


def test_dsl_wires_its_machinery_in_one_method_section(tmp_path):
    from medsim.engines import SubspaceHandler, SubspaceRoutingLoss

    parser = _parser("isic_dsl", output_dir=str(tmp_path), image_size=32, widen_factor=0.25)
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.loss_function, SubspaceRoutingLoss)
    names = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    # the order the handlers must run in at each epoch end
    assert names[:5] == ["ValidationHandler", "TrainingHooks", "EpochRecorder", "SubspaceHandler", "Checkpointer"]
    assert names[5] == "MetricsLogger"
    st = parser.get_parsed_content("method#subspaces")
    assert parser.get_parsed_content("train#checkpointer").objects["subspaces"] is st
    assert trainer.loss_function.subspaces is st
    assert isinstance(parser.get_parsed_content("method#handlers")[0], SubspaceHandler)
    assert torch.is_tensor(trainer.optimizer.param_groups[0]["params"][0])


@pytest.mark.parametrize("bundle", NOT_DSL + SSL)
def test_the_layers_are_the_list_monais_runner_gets(bundle):
    meta = json.loads((ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())
    layers = [(ROOT / "bundles" / bundle / "configs" / f).resolve() for f in meta["config_files"]["train"]]
    assert [Path(f) for f in _bundle_files(ROOT / "bundles" / bundle, None)] == layers
    assert layers[0] == ROOT / "bundles" / "isic_dsl" / "configs" / "train.json"


def test_variants_are_found_in_the_configs_folder():
    assert bundle_variants(ROOT / "bundles" / "isic_dsl") == ["classifier", "contrastive", "margin", "mml", "triplet"]
    assert "nodiv" in bundle_variants(ROOT / "bundles" / "isic_abe")
    from medsim.errors import MedsimError

    with pytest.raises(MedsimError, match="no variant 'evaluate'"):
        _bundle_files(ROOT / "bundles" / "isic_dsl", "evaluate")
    with pytest.raises(MedsimError, match="did you mean 'classifier'"):
        _bundle_files(ROOT / "bundles" / "isic_dsl", "clasifier")


def test_a_layer_list_naming_a_missing_file_is_a_clear_error(tmp_path):
    from medsim.errors import MedsimError

    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.json").write_text("{}")
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"config_files": {"train": ["../x.json", "train.json"]}}))
    with pytest.raises(MedsimError, match=r"metadata.json: config_files#train names .*x.json, which does not exist"):
        _bundle_files(bundle, None)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"config_files": {"train": "train.json"}}))
    with pytest.raises(MedsimError, match="must be a list"):
        _bundle_files(bundle, None)
