"""What a self-supervised model sees: the views of medsim.data.views and MedAug pairs (issue 11, parts 2-3).

Rows of HAM10000 dermoscopy images (original + RGB views) and NIH chest X-rays (original + X-ray views + one
view of a MedAug partner: another image of the same patient, same view position), un-normalised to [0, 1] and
drawn at their true intensities (no per-tile stretching, so brightness/contrast jitter stays visible). The .md
lists the MedAug pair statistics of the NIH metadata per criterion.

    python benchmarks/ssl_views.py --data ../shared/data --out benchmarks/results/ssl_views

Writes ``<out>.png`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
from pathlib import Path

import numpy as np


def _tile(img, size: int) -> "np.ndarray":
    """(C, H, W) in [0, 1], MONAI's (x, y) order → (size, size, 3) uint8 as the file looks."""
    a = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    a = np.swapaxes(a, -1, -2)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    a = (np.moveaxis(a, 0, -1) * 255).round().astype(np.uint8)
    idx = lambda n: (np.arange(size) * n // size)  # noqa: E731  (nearest-neighbour upscaling)
    return a[idx(a.shape[0])][:, idx(a.shape[1])]


def _sheet(sections: list[tuple[str, list[str], list[list[np.ndarray]]]], path: Path, size: int) -> None:
    from PIL import Image, ImageDraw

    from medsim.viz.contact_sheet import save_png

    pad, head = 4, 16
    cols = max(len(r) for _, _, rows in sections for r in rows)
    height = sum(2 * head + len(rows) * (size + pad) for _, _, rows in sections) + pad
    sheet = Image.new("RGB", (pad + cols * (size + pad), height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for title, captions, rows in sections:
        draw.text((pad, y), title, fill=(255, 255, 255))
        for c, cap in enumerate(captions):
            draw.text((pad + c * (size + pad) + 2, y + head), cap, fill=(200, 200, 200))
        y += 2 * head
        for row in rows:
            for c, t in enumerate(row):
                sheet.paste(Image.fromarray(t), (pad + c * (size + pad), y))
            y += size + pad
    save_png(sheet, path)


def run(data: Path, out: Path, *, n_images: int = 4, n_views: int = 4, size: int = 64, seed: int = 0) -> dict:
    import torch

    from medsim.data.medaug import CRITERIA, MedAugPaird, pair_candidates, read_cxr_metadata
    from medsim.data.phi import Anonymizer
    from medsim.data.transforms import gray2d_transforms, rgb2d_transforms
    from medsim.data.views import rgb_view_transforms, xray_view_transforms
    from medsim.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    tile = 2 * size
    # --- dermoscopy: original (eval loading, 2x the view size, un-normalised) + views
    ham = sorted((data / "ham10000" / "images").glob("*.jpg"))
    ham = [ham[i] for i in rng.choice(len(ham), n_images, replace=False)]
    load = rgb2d_transforms((2 * size, 2 * size), normalize=False)
    views = rgb_view_transforms((size, size), n_views=n_views)
    views.set_random_state(seed=seed)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb_rows = [[_tile(load({"image": str(p)})["image"], tile)] +
                [_tile(v * std + mean, tile) for v in views({"image": str(p)})["views"]] for p in ham]
    # --- chest X-rays: original + views + one view of a MedAug partner (same patient, same view position)
    anon = Anonymizer(secrets.token_bytes(32))  # a throwaway salt: nothing hashed here is kept
    items = read_cxr_metadata(data / "cxr_nih1000" / "metadata.csv", anonymizer=anon)
    stats = {c: pair_candidates(items, c).stats() for c in CRITERIA}
    cand = pair_candidates(items, "same_patient_same_view")
    paired = [it for it in items if cand.partners[it["image"]] != (it["image"],)]
    chosen = [paired[i] for i in rng.choice(len(paired), n_images, replace=False)]
    gload = gray2d_transforms((size, size))
    xviews = xray_view_transforms((size, size), n_views=n_views - 1)
    xviews.set_random_state(seed=seed)
    pair = MedAugPaird(cand, seed=seed, spatial_size=(size, size))
    xray_rows = []
    for it in chosen:
        partner_view = pair({"image": it["image"]})["views"][1]
        xray_rows.append([_tile(gload({"image": it["image"]})["image"], tile)] +
                         [_tile(v, tile) for v in xviews({"image": it["image"]})["views"]] + [_tile(partner_view, tile)])
    _sheet([(f"HAM10000 dermoscopy: rgb_view_transforms({size}x{size}), un-normalised",
             ["original"] + [f"view {i + 1}" for i in range(n_views)], rgb_rows),
            (f"NIH chest X-ray: xray_view_transforms({size}x{size}) + MedAug partner (same patient, same view)",
             ["original"] + [f"view {i + 1}" for i in range(n_views - 1)] + ["partner view"], xray_rows)],
           out.with_suffix(".png"), tile)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ssl_views"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stats = run(args.data, args.out, seed=args.seed)
    command = "python benchmarks/ssl_views.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# SSL views and MedAug pairs", "", f"Command: `{command}`", "",
             f"![views]({args.out.with_suffix('.png').name})", "",
             "Top: 4 HAM10000 images, original (eval loading) + 4 `rgb_view_transforms` views (crop-resize of "
             "area 0.2-1, flips, 90° rotations, per-channel contrast/brightness, blur), un-normalised. Bottom: 4 NIH "
             "X-rays, original + 3 `xray_view_transforms` views (crop of area 0.5-1, ±10°, contrast/brightness) + "
             "a view of a MedAug partner (`same_patient_same_view`). Intensities are drawn as they are (clipped to "
             "[0, 1], not stretched per tile).", "",
             "## MedAug pair candidates on cxr_nih1000/metadata.csv (1000 images, 264 patients)", "",
             "| criterion | paired images | fallback to itself | candidate pairs (ordered) | partners per paired image "
             "(mean / max) |", "|---|---|---|---|---|"]
    lines += [f"| `{c}` | {s['n_paired']} | {s['n_fallback']} | {s['n_pairs']} | {s['mean_partners']} / "
              f"{s['max_partners']} |" for c, s in stats.items()]
    lines += ["", "NIH has one image per follow-up, so `diff_followup` excludes nothing beyond `same_patient`; "
              "`none` pairs every image with itself by design (plain two-view MoCo), not as a fallback.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
