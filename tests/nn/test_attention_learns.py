"""DSL's attention learns *where the class evidence is*: on synthetic images whose class-1 evidence (a checkered
square) sits at a random position next to an equally bright plain square present in every image (a salient
distractor that says nothing about the class), the trained map's peak lands on the evidence, not on the distractor,
and the map varies from image to image. An untrained network's map does not, and neither does the input's own
brightness — so the test can only pass through training.

The loss is PML's ``NormalizedSoftmaxLoss`` (a proxy softmax on the L2-normalised embedding, through
:class:`medsim.losses.MetricLoss`): over 8 seeds the evidence hit rate is >= 0.9 on all 8 after 400 steps. Two
losses that look natural were measured and are not used, because the attention does not reliably learn under them:

- DSL's ``MarginLoss`` (``bundles/isic_dsl``'s ``metric_loss``): 6 of 8 seeds localise. The loss reaches exactly 0
  once the trunk alone separates the classes (here within ~50 steps), and from then on nothing trains the attention:
  it localises only as far as it got before that.
- cross-entropy on the classifier head (the classifier baseline): the map saturates (mean ≈ 0.99, per-cell spread
  ≈ 0.006 by 300 steps for seed 0): on the unnormalised logits the attention acts as a gain, and a larger gain
  always lowers the cross-entropy, so every cell's sigmoid is pushed towards 1 and the peak drifts off the evidence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medsim.nn import Embedder, param_groups

SIZE, SQUARE, CELL = 64, 8, 8  # 64 px images, 8 px squares; resnet10 cut after layer2: an 8 × 8 map, 8 px cells
AMP = 2.0  # brightness of both squares over N(0, 1) noise: the checkered one is 0 / 2·AMP in 2 px checks, mean AMP
STEPS, BATCH = 400, 32


def _centre(g: torch.Generator, away_from: torch.Tensor | None = None) -> torch.Tensor:
    """A random square centre (row, col), at least SQUARE + 4 px (Chebyshev) from ``away_from``."""
    while True:
        c = torch.randint(SQUARE // 2, SIZE - SQUARE // 2 + 1, (2,), generator=g)
        if away_from is None or int((c - away_from).abs().max()) >= SQUARE + 4:
            return c


def make_images(n: int, g: torch.Generator, label: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` noise images (1, SIZE, SIZE), each with a plain bright square (the distractor); class 1 also holds a
    checkered square of the same mean brightness (the evidence). Returns images, labels (random unless ``label``),
    evidence centres and distractor centres (n, 2) as (row, col) in pixels (evidence centres drawn for class 0 too,
    unused)."""
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, 2, (n,), generator=g) if label is None else torch.full((n,), label)
    rows, cols = torch.meshgrid(torch.arange(SQUARE), torch.arange(SQUARE), indexing="ij")
    checker = ((rows // 2 + cols // 2) % 2).float() * 2 * AMP
    evidence, distractor = torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        distractor[i] = _centre(g)
        evidence[i] = _centre(g, away_from=distractor[i])
        r, c = (distractor[i] - SQUARE // 2).tolist()
        x[i, :, r:r + SQUARE, c:c + SQUARE] += AMP
        if y[i]:
            r, c = (evidence[i] - SQUARE // 2).tolist()
            x[i, :, r:r + SQUARE, c:c + SQUARE] += checker
    return x, y, evidence, distractor


def peak_near(maps: torch.Tensor, centres: torch.Tensor) -> float:
    """Fraction of maps (B, h, w) whose argmax cell is the cell holding the centre or one of its 8 neighbours."""
    w = maps.shape[-1]
    peak = maps.flatten(1).argmax(1)
    cell = centres.clamp(max=SIZE - 1) // CELL
    return float((((peak // w - cell[:, 0]).abs() <= 1) & ((peak % w - cell[:, 1]).abs() <= 1)).float().mean())


def attention_maps(net: Embedder, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)["attention"][:, 0]


def train(seed: int = 0) -> tuple[Embedder, tuple[torch.Tensor, ...], torch.Tensor]:
    """A small DSL Embedder trained STEPS steps on random batches; returns it, held-out class-1 images with their
    centres, and the untrained network's maps of those images."""
    from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

    from medsim.losses import MetricLoss

    torch.manual_seed(seed)
    net = Embedder("resnet10", in_channels=1, cut="layer2", widen_factor=0.25, embedding_dim=16, attention="dsl")
    held_out = make_images(128, torch.Generator().manual_seed(1000 + seed), label=1)
    untrained = attention_maps(net, held_out[0])
    loss = MetricLoss(NormalizedSoftmaxLoss(num_classes=2, embedding_size=16, temperature=0.05))
    opt = torch.optim.Adam(param_groups(net, loss, trunk_lr=1e-3, head_lr=1e-3))  # the loss's proxies: head
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        net.train()
        x, y, _, _ = make_images(BATCH, g)
        value = loss(net(x)["embedding"], y)
        opt.zero_grad()
        value.backward()
        opt.step()
    return net, held_out, untrained


def test_the_synthetic_task_does_not_give_the_answer_away():
    """The input's own brightness (8 × 8 px means) does not single out the evidence: the distractor is as bright."""
    x, _, evidence, distractor = make_images(256, torch.Generator().manual_seed(7), label=1)
    brightness = F.avg_pool2d(x, CELL)[:, 0]
    assert peak_near(brightness, evidence) < 0.7 and peak_near(brightness, distractor) > 0.3


def test_attention_peak_follows_the_class_evidence():
    net, (x, _, evidence, distractor), untrained = train()
    trained = attention_maps(net, x)
    # before training: the peak is nowhere in particular (chance for a 3 × 3 neighbourhood on 8 × 8 is ~0.13;
    # the checkered square stirs random features a little) and the map barely depends on the image
    assert peak_near(untrained, evidence) < 0.5
    assert float(untrained.std(0).mean()) < 0.015
    # after: on the evidence, not on the equally bright distractor, and the map changes with the image
    assert peak_near(trained, evidence) >= 0.85, peak_near(trained, evidence)
    assert peak_near(trained, distractor) <= 0.2, peak_near(trained, distractor)
    spread = float(trained.std(0).mean())  # per-cell std across images, mean over cells (val_attention_spread)
    assert spread > 0.03, spread
