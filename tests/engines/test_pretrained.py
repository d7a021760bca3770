"""``-o pretrained=RUN``: any embedding bundle starts its trunk from another run; a trunk that does not match is a
clear error; the other run is loaded weights-only."""

from __future__ import annotations

import pytest
import torch

from medsim.engines.pretrained import load_pretrained
from medsim.errors import MedsimError
from medsim.nn import Embedder


def _tiny(**kw):
    args = dict(backbone="resnet10", cut="layer3", embedding_dim=32, widen_factor=0.25)
    return Embedder(**{**args, **kw})


def test_the_trunk_comes_from_the_run_and_the_heads_stay_fresh(tiny_run):
    from medsim.export.run import load_run

    donor = load_run(tiny_run).network
    torch.manual_seed(1)
    net = _tiny(attention="none", embedding_dim=8)  # another head: only the trunk must match
    fresh_embed = net.embed.weight.detach().clone()
    assert load_pretrained(net, tiny_run) is net
    for (k, a), b in zip(donor.trunk.state_dict().items(), net.trunk.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(net.embed.weight, fresh_embed)
    load_pretrained(net, tiny_run / "last.pt")  # a checkpoint file inside a run folder works too
    assert load_pretrained(net, None) is net and load_pretrained(net, "") is net


def test_a_trunk_that_does_not_match_is_a_clear_error(tiny_run):
    net = _tiny(widen_factor=0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MedsimError, match=r"its trunk Embedder\(backbone='resnet10'.*widen_factor=0.25.*does not match"):
        load_pretrained(net, tiny_run)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded
    with pytest.raises(MedsimError, match="no such run folder"):
        load_pretrained(net, tiny_run / "missing")


def test_a_doctored_pretrained_checkpoint_runs_nothing(tiny_run, tmp_path):
    import os
    import shutil

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    state = torch.load(run / "best.pt", weights_only=True)
    state["evil"] = Boom()
    torch.save(state, run / "best.pt")
    with pytest.raises(MedsimError, match="refused"):
        load_pretrained(_tiny(), run)
    assert not marker.exists()


def test_a_bundle_starts_from_a_run_via_one_config_id(tiny_run, sample_root, tmp_path, tiny_overrides):
    """isic_abe (another network, same trunk arguments) trained with -o pretrained=<isic_dsl run>: its trunk starts
    as the run's (checked with 0 epochs of change: lr 0)."""
    from pathlib import Path

    from medsim.engines.workflow import train_bundle
    from medsim.export.run import load_run

    out = tmp_path / "abe"
    ov = {**tiny_overrides, "pretrained": str(tiny_run), "learning_rate": 0.0, "n_learners": 2}
    train_bundle(Path(__file__).resolve().parents[2] / "bundles" / "isic_abe", dataset_dir=str(sample_root / "derm"), output_dir=str(out), overrides=ov)
    donor, got = load_run(tiny_run).network, load_run(out).network
    for (k, a), b in zip(donor.trunk.state_dict().items(), got.trunk.state_dict().values()):
        if "num_batches_tracked" in k or "running_" in k:
            continue  # BatchNorm statistics move in train mode even at lr 0
        assert torch.equal(a, b), k
