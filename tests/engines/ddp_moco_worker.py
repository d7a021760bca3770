"""Worker for test_distributed.py: a few MoCo v2 steps on fixed data, either in one process (the whole batch) or as
one rank of a torchrun group (its slice of each batch, DDP, the loss on the gathered global batch). Writes the
per-step losses, the final queue and weights to ``sys.argv[1]`` (rank 0; every rank writes its own queue)."""

from __future__ import annotations

import sys

import torch


def main(out: str) -> None:
    from medsim.engines.distributed import GlobalBatchLoss, init_distributed, wrap_ddp
    from medsim.nn import Embedder
    from medsim.ssl import MoCoLoss, MoCoV2

    info = init_distributed()
    torch.manual_seed(0)
    encoder = Embedder(backbone="resnet10", spatial_dims=2, in_channels=3, cut="layer3", embedding_dim=16,
                       attention="none", widen_factor=0.25, freeze_bn=True)
    ssl = MoCoV2(encoder, projection_dim=8, hidden_dim=16, queue_size=24, momentum=0.9)
    ssl.train()
    net = wrap_ddp(ssl)
    loss_fn = GlobalBatchLoss(MoCoLoss(temperature=0.2))
    opt = torch.optim.SGD(ssl.trainable_parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    steps, batch = 4, 8  # 4 x 8 keys through a queue of 24: the ring wraps
    data = torch.rand(steps, batch, 3, 32, 32, generator=g)
    noise = [0.1 * torch.randn(steps, batch, 3, 32, 32, generator=g) for _ in range(2)]
    part = batch // info.world
    rows = slice(info.rank * part, (info.rank + 1) * part)
    losses = []
    for s in range(steps):
        views = [(data[s] + n[s])[rows] for n in noise]
        pred = net(views)
        loss = loss_fn(pred, {"label": torch.arange(batch)[rows] + s * batch})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    torch.save({"losses": losses, "queue": ssl.queue.clone(), "queue_ptr": int(ssl.queue_ptr),
                "weights": {k: v.clone() for k, v in ssl.state_dict().items()}}, f"{out}.rank{info.rank}")


if __name__ == "__main__":
    main(sys.argv[1])
