"""The HAM10000 training recipe shared by the bundle benchmarks (``dsl_table1``, ``abe_ablation``,
``gated_attention``, ``loss_attention``): the same class-stratified, lesion-grouped subset (``max_items`` images,
``split_seed`` 0, so every benchmark holds out the same test lesions), trained through ``medsim train``'s
``train_bundle`` with TensorBoard off, and the command-line options that describe it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def recipe_parser(doc: str | None, *, name: str, work: str, epochs: int, image_size: int = 64,
                  backbone: str = "resnet18", widen_factor: float = 0.5, threads: int | None = None,
                  report_from: bool = False) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the recipe's options; each benchmark adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-dir", required=True)
    ap.add_argument("--out", default=f"benchmarks/results/{name}")
    ap.add_argument("--work", default=work, help="run directories (deleted first)")
    ap.add_argument("--max-items", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--image-size", type=int, default=image_size)
    ap.add_argument("--backbone", default=backbone)
    ap.add_argument("--widen-factor", type=float, default=widen_factor)
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch CPU threads (1 avoids oversubscription when other jobs share the cores)")
    ap.add_argument("--amp", action="store_true",
                    help="bf16 autocast + channels_last for training and validation (the bundles' amp knobs)")
    ap.add_argument("--pretrained", default=None,
                    help="start the trunk from this run (e.g. a derm_ssl run folder): the bundles' `pretrained`")
    if report_from:
        ap.add_argument("--report-from", default=None, help="only re-render <out>.md from a saved results JSON")
    return ap


def common_overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Bundle overrides of the recipe (+ ``extra``), and torch's thread count set from ``--threads``."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    amp = {"amp": True, "channels_last": True} if getattr(args, "amp", False) else {}
    pretrained = {"pretrained": str(Path(args.pretrained).resolve())} if getattr(args, "pretrained", None) else {}
    return {"max_epochs": args.epochs, "max_items": args.max_items, "image_size": args.image_size,
            "backbone": args.backbone, "widen_factor": args.widen_factor, "split_seed": 0,
            "train#output_handlers#1#_disabled_": True, **amp, **pretrained, **extra}


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark (``python <script> <args>``), for the results' "Command:" line."""
    import sys

    return "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


def write_results(out: str | Path, doc: dict, report: Callable[[dict], str]) -> int:
    """Write ``<out>.json`` (the whole document) and ``<out>.md`` (``report(doc)``), print the report; returns 0."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = report(doc)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def rerender(args: argparse.Namespace, report: Callable[[dict], str]) -> bool:
    """With ``--report-from``: write ``<out>.md`` from that results JSON and return True (nothing to train)."""
    if not getattr(args, "report_from", None):
        return False
    doc = json.loads(Path(args.report_from).read_text())
    Path(args.out).with_suffix(".md").write_text(report(doc))
    return True


def isic_dsl_parser(dataset_dir: str, output_dir: str | Path, **overrides: Any) -> Any:
    """The isic_dsl bundle's config parsed and initialised on ``dataset_dir`` (writes its split into
    ``output_dir``) without training: for benchmarks that score an untrained or saved network."""
    from monai.bundle import ConfigWorkflow

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "isic_dsl"
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"),
                        meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="train",
                        logging_file=False, bundle_root=str(bundle), dataset_dir=dataset_dir,
                        output_dir=str(output_dir), **overrides)
    wf.initialize()
    return wf.parser

