"""medsim.engines.segmentation: few-label fine-tuning (MONAI SupervisedTrainer + DiceCELoss) and the Dice evaluation
(sliding-window inference + DiceMetric per organ) on the sample CT, whose label map has three organs; the network
(medsim.nn.segmentation.ResNetUNet) keeps its trunk's keys so pretrained weights load (PGL's downstream task)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medsim.data.segmentation import labelled_volumes, segmentation_transforms
from medsim.engines.segmentation import evaluate_segmentation, finetune_segmentation
from medsim.nn.segmentation import ResNetUNet

NAMES = {1: "liver", 2: "kidney", 3: "spine"}  # medsim.data.sample.CT_LABELS
ROI = (16, 16, 16)
PIXDIM = (1.5, 1.5, 2.0)  # the sample's own grid (24 x 24 x 16 voxels)


def _net(**kw):
    return ResNetUNet("resnet10", out_channels=4, cut="layer2", widen_factor=0.25, decoder_channels=(16, 16, 8, 8),
                      **kw)


def test_the_network_is_a_unet_on_the_trunk_and_keeps_its_keys():
    from medsim.nn.backbones import make_backbone

    torch.manual_seed(0)
    net = _net()
    trunk, _ = make_backbone("resnet10", spatial_dims=3, in_channels=1, cut="layer2", widen_factor=0.25)
    assert net.trunk is net.backbone and list(net.trunk.state_dict()) == list(trunk.state_dict())
    assert net(torch.rand(2, 1, 16, 16, 8)).shape == (2, 4, 16, 16, 8)
    assert net.stride == 8 and net(torch.rand(1, 1, 24, 16, 8)).shape == (1, 4, 24, 16, 8)
    with pytest.raises(ValueError, match="multiples of the deepest stride 8"):
        net(torch.rand(1, 1, 20, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        net(torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="decoder_channels"):
        ResNetUNet("resnet10", cut="layer4", widen_factor=0.25, decoder_channels=(8, 8))


def test_backbone_weights_load_exactly(tmp_path):
    torch.manual_seed(1)
    donor = _net()
    torch.save(donor.trunk.state_dict(), tmp_path / "trunk.pt")
    torch.manual_seed(2)
    fresh, loaded = _net(), _net(backbone_weights=tmp_path / "trunk.pt")
    for k, v in donor.trunk.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[k], v)
    assert any(not torch.equal(fresh.trunk.state_dict()[k], v) for k, v in donor.trunk.state_dict().items())


def test_labelled_volumes_pairs_images_with_their_label_maps(tmp_path, sample_root):
    assert labelled_volumes(sample_root / "ct") == [{"image": str(sample_root / "ct" / "ct.nii.gz"),
                                                     "label": str(sample_root / "ct" / "labels.nii.gz")}]
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / "dec" / d).mkdir(parents=True)
    for name in ("a.nii.gz", "b.nii.gz"):
        for d in ("imagesTr", "labelsTr"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "dec" / d / name)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "dec" / "imagesTr" / "c.nii.gz")
    got = labelled_volumes(tmp_path / "dec")
    assert [(p["image"].split("/")[-2:], p["label"].split("/")[-2:]) for p in got] == [
        (["imagesTr", "a.nii.gz"], ["labelsTr", "a.nii.gz"]), (["imagesTr", "b.nii.gz"], ["labelsTr", "b.nii.gz"])]


def test_dice_per_organ_is_monais_dice_of_the_prediction(sample_root):
    """A network that calls every voxel liver: liver Dice = 2|L| / (|L| + |V|) on the resampled label map, the other
    organs 0 (predicted empty, present in the reference)."""

    class AllLiver(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
            logits[:, 1] = 1.0
            return logits

    items = labelled_volumes(sample_root / "ct")
    ev = segmentation_transforms(ROI, pixdim=PIXDIM)
    label = ev(dict(items[0]))["label"]
    liver, total = float((label == 1).sum()), float(label.numel())
    res = evaluate_segmentation(AllLiver(), items, ev, roi_size=ROI, label_names=NAMES)
    assert res["dice"]["liver"] == pytest.approx(2 * liver / (liver + total), abs=1e-5)
    assert res["dice"]["kidney"] == 0.0 and res["dice"]["spine"] == 0.0 and res["n_volumes"] == 1
    assert res["mean_dice"] == pytest.approx(res["dice"]["liver"] / 3, abs=1e-6)


def test_fine_tuning_on_the_sample_ct_learns_every_organ(sample_root):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    items = labelled_volumes(sample_root / "ct")
    net = _net()
    tr = segmentation_transforms(ROI, train=True, pixdim=PIXDIM)
    ev = segmentation_transforms(ROI, pixdim=PIXDIM)
    hist = finetune_segmentation(net, items, tr, max_epochs=15, steps_per_epoch=6, batch_size=2, learning_rate=1e-2)
    res = evaluate_segmentation(net, items, ev, roi_size=ROI, label_names=NAMES)
    print("DiceCE per epoch", [round(h["loss"], 3) for h in hist], "Dice", res["dice"])
    assert len(hist) == 15 and hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert all(v > 0.4 for v in res["dice"].values()), res["dice"]  # untrained: 0 (all background)
