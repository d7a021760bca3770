"""The ``medsim`` command line. Thin: each command parses, then calls one library function.

Imports of torch/MONAI happen inside the commands so ``medsim --help`` is instant. Errors caused by the input
(:class:`~medsim.errors.MedsimError`) print one line per problem and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

from medsim.errors import MedsimError
from medsim.export.profiles import DEFAULTS

LAYOUT_CHOICES = ["auto", "ham10000", "isic2019", "folder", "csv", "dicom", "nifti", "tiff", "image"]


class _ProgressFormatter(logging.Formatter):
    """INFO lines as plain progress text; warnings and errors keep their level and logger name, so they stand out."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.levelno == logging.INFO else super().format(record)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="medsim")
def cli(debug: bool, verbose: int) -> None:
    """medsim: learn what makes medical images similar, show where the model looked, serve it.

    \b
    Groups and commands:
      data       inspect, check, split and prepare sources (DICOM, NIfTI, dermoscopy, histology, CSV)
      train      train a bundle (DSL, MML, baselines)
      evaluate   retrieval / clustering metrics of a run
      export     ONNX / TensorRT export with parity checks
      index      build a case index (faiss) from an exported model
      search     query similar cases
      localize   attention-derived lesion masks, boxes and overlays
    """
    # medsim's own progress (INFO: epochs, resumes, backends) is shown by default; other libraries speak from
    # WARNING (-v: everyone's INFO, -vv: DEBUG)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("medsim").setLevel(min(level, logging.INFO))
    for handler in logging.getLogger().handlers:
        if type(handler.formatter) is logging.Formatter:  # ours, not a test harness' or an application's
            handler.setFormatter(_ProgressFormatter(handler.formatter._fmt))


def _threads_option(*, torch: bool):
    """``--threads N`` (or ``MEDSIM_THREADS``): CPU threads for torch (commands that run it) and onnxruntime."""

    def apply(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
        if value is not None:
            from medsim.threads import set_threads

            set_threads(value, torch=torch)

    return click.option("--threads", type=click.IntRange(min=1), default=None, envvar="MEDSIM_THREADS",
                        expose_value=False, callback=apply,
                        help="CPU threads for " + ("torch and " if torch else "") + "onnxruntime (env MEDSIM_THREADS; "
                             "default: the libraries' choice).")


# ------------------------------------------------------------------------------------------------------ data
@cli.group()
def data() -> None:
    """Read, check and split data sources."""


def _source_options(f):
    f = click.option("--layout", type=click.Choice(LAYOUT_CHOICES), default="auto", show_default=True,
                     help="Dataset layout (detected when auto).")(f)
    f = click.option("--image-column", default=None, help="CSV: the image path column.")(f)
    f = click.option("--label-column", default=None, help="CSV: the label column.")(f)
    return f


def _csv_options(image_column: str | None, label_column: str | None) -> dict:
    return {k: v for k, v in (("image_column", image_column), ("label_column", label_column)) if v}


@data.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@_source_options
@click.option("--no-decode", is_flag=True, help="Read tables and headers only; do not open every image.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--strict", is_flag=True, help="Exit 2 when any file is unreadable.")
def data_inspect(path: Path, layout: str, image_column: str | None, label_column: str | None, no_decode: bool,
                 json_out: Path | None, strict: bool) -> None:
    """Report what PATH holds: count, classes, shapes, spacing, series, unreadable files."""
    from medsim.data.inspect import format_report, inspect_source
    from medsim.errors import atomic_write_text

    report = inspect_source(path, layout=layout, decode=not no_decode, progress=sys.stderr.isatty(),
                            **_csv_options(image_column, label_column))
    click.echo(format_report(report))
    if json_out:
        atomic_write_text(json_out, json.dumps(report, indent=2))
    if strict and report["unreadable"]:
        sys.exit(2)


@data.command("check")
@click.argument("source", type=click.Path(path_type=Path))
@_source_options
@click.option("--lenient", is_flag=True, help="Skip bad items, continue, and write a report of them.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Where lenient mode writes the skip report (default: SOURCE-skipped.json in the cwd).")
def data_check(source: Path, layout: str, image_column: str | None, label_column: str | None, lenient: bool,
               report: Path | None) -> None:
    """Open every file of SOURCE as training would; strict mode exits 2 listing every bad file."""
    from medsim.data.prepare import load_checked

    src, result = load_checked(source, layout=layout, lenient=lenient, report_path=report,
                               **_csv_options(image_column, label_column))
    click.echo(f"{len(src.items)} usable item(s) in {source}" +
               (f"; {len(result.report.skipped)} skipped (see {result.report_path})" if result.report.skipped
                else ""))


@data.command("split")
@click.argument("source", type=click.Path(path_type=Path))
@_source_options
@click.option("--by", default="lesion_id", show_default=True,
              help="Grouping kept within one split: lesion_id, patient_id, study, series, image.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Split datalist JSON.")
@click.option("--fractions", nargs=3, type=float, default=(0.7, 0.15, 0.15), show_default=True,
              help="Train, validation, test fractions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lenient", is_flag=True, help="Skip bad items (reported) instead of stopping.")
@click.option("--no-decode", is_flag=True, help="Check tables only; do not open every image.")
def data_split(source: Path, layout: str, image_column: str | None, label_column: str | None, by: str, out: Path,
               fractions: tuple[float, float, float], seed: int, lenient: bool, no_decode: bool) -> None:
    """Group-aware stratified train/validation/test split of SOURCE, saved as a datalist JSON."""
    from medsim.data.prepare import make_split

    summary = make_split(source, out, by=by, fractions=fractions, seed=seed, layout=layout, lenient=lenient,
                         decode=not no_decode, **_csv_options(image_column, label_column))
    click.echo(format_split_table(summary))
    click.echo(f"wrote {out}")


def format_split_table(summary: dict) -> str:
    classes = sorted({c for s in summary.values() for c in s["classes"]}, key=str)
    head = f"{'split':<11} {'items':>6} {'groups':>7}  " + "  ".join(f"{str(c):>7}" for c in classes)
    rows = [f"{k:<11} {v['items']:>6} {v['groups']:>7}  " + "  ".join(f"{v['classes'].get(c, 0):>7}"
                                                                          for c in classes)
            for k, v in summary.items()]
    return "\n".join([head, *rows])


@data.command("sample")
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--seed", type=int, default=0, show_default=True)
def data_sample(out: Path | None, seed: int) -> None:
    """Write the embedded synthetic sample (dermoscopy-like with masks, DICOM, CT volume) to OUT."""
    from medsim.data.sample import default_sample_dir, make_sample

    paths = make_sample(out or default_sample_dir(), seed=seed)
    for k, p in paths.items():
        click.echo(f"{k:<6} {p}")


@data.command("prepare")
@click.argument("source", type=click.Path(path_type=Path), required=False)
@_source_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/prepare"), show_default=True)
@click.option("--by", default="lesion_id", show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="2D side length (3D: ROI edge).")
@click.option("--lenient", is_flag=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data_prepare(source: Path | None, layout: str, image_column: str | None, label_column: str | None, out: Path,
                 by: str, size: int, lenient: bool, seed: int) -> None:
    """Check, split and run SOURCE (default: the embedded sample) through its MONAI pipeline; write the split,
    a preview image of transformed samples and a summary."""
    from medsim.data.prepare import prepare

    result = prepare(source, out, by=by, size=size, lenient=lenient, seed=seed, layout=layout,
                     **_csv_options(image_column, label_column))
    for line in result["lines"]:
        click.echo(line)


# ---------------------------------------------------------------------------------------- later capabilities
@cli.command("train")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--variant", default=None,
              help="An override config of the bundle: the name of any file in BUNDLE/configs/ other than train, "
                   "metadata, evaluate and inference (e.g. isic_dsl: mml, triplet; an unknown name lists them).")
@click.option("--dataset-dir", default=None,
              help="Dataset folder or CSV datalist in any layout `data inspect` reads, detected: "
                   f"{', '.join(c for c in LAYOUT_CHOICES if c != 'auto')} (see README 'Layouts read'); default: the "
                   "embedded sample. Splits keep each lesion (-o split_by=patient_id: patient) in one split; a layout "
                   "without that column (a class-per-folder tree, a bare CSV) is split per image, with a warning.")
@click.option("--output", "output", default=None, help="Run directory (checkpoints, metrics, split).")
@click.option("--lenient", is_flag=True, help="Skip unusable files/rows and train on the rest (listed in "
                                              "<run>/skipped.json) instead of stopping.")
@click.option("-o", "overrides", multiple=True, metavar="ID=VALUE",
              help="Override a config id, e.g. -o train#trainer#max_epochs=1 or -o max_k=4 (repeatable).")
@click.option("--allow-expressions", is_flag=True,
              help="Let -o values be MONAI expressions ($...) or macros (%...), which run code; off by default.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes on this machine (torchrun underneath: gloo on CPU, NCCL on GPUs). Each "
                   "takes 1/N of every batch; losses and updates equal one process with the whole batch. Several "
                   "machines: start `torchrun ... -m medsim.cli train ...` on each (README 'Scaling out').")
@_threads_option(torch=True)
def train(bundle: Path, variant: str | None, dataset_dir: str | None, output: str | None, lenient: bool,
          overrides: tuple[str, ...], allow_expressions: bool, nproc: int) -> None:
    """Train BUNDLE (e.g. bundles/isic_dsl); prints test NMI and R@1 of the best validation checkpoint.

    A run directory that holds last.pt resumes from it."""
    from medsim.engines.distributed import launch_rank, launched_by_torchrun
    from medsim.engines.workflow import parse_overrides, run_torchrun, train_bundle

    ov = parse_overrides(overrides, allow_expressions=allow_expressions)
    if nproc > 1 and not launched_by_torchrun():
        args = ["train", str(bundle), *(["--variant", variant] if variant else []),
                *(["--dataset-dir", dataset_dir] if dataset_dir else []), *(["--output", output] if output else []),
                *(["--lenient"] if lenient else []), *[a for o in overrides for a in ("-o", o)],
                *(["--allow-expressions"] if allow_expressions else [])]
        run_torchrun(bundle, variant, ov, nproc, args)
        return
    if lenient:
        ov["lenient"] = True
    summary = train_bundle(bundle, variant=variant, dataset_dir=dataset_dir, output_dir=output, overrides=ov)
    if launch_rank() != 0:  # several processes: rank 0 reports
        return
    click.echo(f"run: {summary['output_dir']} ({summary['seconds']} s)")
    if summary.get("epochs_trained") == 0 and (Path(summary["output_dir"]) / "last.pt").is_file():
        click.echo("nothing trained: this run folder was already complete (see the warning above); the result below "
                   "is its existing best.pt. Start a new run with --output NEW_DIR (or delete the folder), or raise "
                   "-o max_epochs=N to train on.")
    if "nmi" in summary:
        extra = (f"  accuracy {summary['accuracy']:.4f}  balanced accuracy {summary['balanced_accuracy']:.4f}"
                 if "accuracy" in summary else "")
        click.echo(f"NMI {summary['nmi']:.4f}  R@1 {summary['R@1']:.4f}{extra}  (test split)")


@cli.command("evaluate")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "validation", "training"]))
@click.option("--checkpoint", default="best.pt", show_default=True, help="best.pt (validation-selected) or last.pt")
@_threads_option(torch=True)
def evaluate(run_dir: Path, split: str, checkpoint: str) -> None:
    """Retrieval and clustering metrics of a run on one split; writes eval_<split>.json and .md.

    Runs of unlabelled volumes get their bundle's label-free evaluation on fixed view pairs instead (ct_sam: point
    matching; ct_pgl: the method's loss); one that records none is refused (exit 2)."""
    from medsim.engines.workflow import evaluate_run
    from medsim.metrics.retrieval import metrics_table

    res = evaluate_run(run_dir, split=split, checkpoint=checkpoint)
    click.echo(metrics_table({f"{run_dir.name} ({split})": res}))


def _list_profiles(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--list-profiles``: print the export profiles as a table and stop (exit 2 naming any invalid one)."""
    if not value or ctx.resilient_parsing:
        return
    from medsim.export.profiles import ProfileError, format_profile_table, load_all_profiles, profile_dirs

    good, bad = load_all_profiles()
    dirs = ", ".join(map(str, profile_dirs()))
    click.echo(f"export profiles (medsim export RUN --out DIR --profile NAME) in {dirs}:")
    click.echo(format_profile_table(good))
    if bad:
        raise ProfileError("\n".join(str(e) for e in bad))
    ctx.exit(0)


@cli.command("export")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder (model.onnx, manifest.json, model.int8.onnx, model.plan, triton/).")
@click.option("--profile", default=None, metavar="NAME|FILE.json",
              help="Export profile: NAME is export/profiles/NAME.json of the checkout (or of the folder "
                   "$MEDSIM_EXPORT_PROFILES names), or give a JSON file. Options given here override its fields; "
                   "the manifest records it.")
@click.option("--list-profiles", is_flag=True, is_eager=True, expose_value=False, callback=_list_profiles,
              help="List the export profiles and exit.")
@click.option("--onnx/--no-onnx", "onnx", default=True, show_default=True,
              help="Export and verify model.onnx; --no-onnx reuses OUT/model.onnx from an earlier export.")
@click.option("--trt/--no-trt", default=DEFAULTS["trt"],
              help="Also build a TensorRT engine (model.plan; needs tensorrt and a GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=DEFAULTS["precision"],
              show_default=True, help="TensorRT precision; int8 without --trt writes an onnxruntime INT8 "
                                      "model.int8.onnx.")
@click.option("--calib", type=click.Path(path_type=Path, exists=True), default=None,
              help="INT8 calibration images: a folder, or a split JSON (its --calib-split); default: the run's own "
                   "--calib-split.")
@click.option("--calib-split", type=click.Choice(["training", "validation", "test"]), default=DEFAULTS["calib_split"],
              show_default=True, help="Split whose images calibrate INT8 (R@1 is measured on validation).")
@click.option("--calib-images", "max_calibration", type=click.IntRange(min=1), default=DEFAULTS["max_calibration"],
              show_default=True, help="At most this many images calibrate INT8.")
@click.option("--quantize", type=click.Choice(["static", "dynamic", "openvino", "none"]), default=DEFAULTS["quantize"],
              callback=lambda ctx, param, value: None if value == "none" else value,
              help="Write model.int8.onnx with onnxruntime quantization (static is the default for int8), or "
                   "model.ov-int8.xml/.bin with OpenVINO NNCF (openvino: the openvino extra); none: no INT8 model, "
                   "overriding a profile.")
@click.option("--triton/--no-triton", default=DEFAULTS["triton"],
              help="Also write a Triton model repository under OUT/triton (serve it with deploy/triton/launch.sh).")
@click.option("--triton-kind", type=click.Choice(["gpu", "cpu"]), default=DEFAULTS["triton_kind"], show_default=True,
              help="Triton instance kind for the ONNX model (cpu serves model.int8.onnx when INT8 was made).")
@click.option("--opset", type=int, default=DEFAULTS["opset"], show_default=True,
              help="ONNX opset, >= 17 (>= 18 uses the dynamo exporter).")
@click.option("--opt-batch", type=int, default=DEFAULTS["opt_batch"], show_default=True,
              help="Parity batch, TensorRT optimum and Triton preferred batch.")
@click.option("--max-batch", type=int, default=DEFAULTS["max_batch"], show_default=True,
              help="TensorRT/Triton largest batch.")
@_threads_option(torch=True)
@click.pass_context
def export(ctx: click.Context, source: Path, out: Path, profile: str | None, onnx: bool, calib: Path | None,
           **settings: Any) -> None:
    """Export SOURCE (a run directory or a checkpoint inside one) to ONNX with a parity check against PyTorch
    and a manifest; optionally INT8, TensorRT and a Triton repository (--profile NAME: all of these from a
    settings file; --list-profiles shows them)."""
    from medsim.export.pipeline import export_run

    record = None
    if profile is not None:
        from medsim.export.profiles import load_profile

        prof = load_profile(profile)
        explicit = {k for k in settings if ctx.get_parameter_source(k) not in
                    (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}
        settings = prof.resolve(settings, explicit)
        record = prof.record(settings, explicit)
    result = export_run(source, out, onnx=onnx, calib=calib, profile=record, **settings)
    for line in result["lines"]:
        click.echo(line)


@cli.group()
def index() -> None:
    """Case indexes (faiss) built from an exported model."""


@index.command("build")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="Export folder (model.onnx + manifest.json from `medsim export`).")
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True,
              help="What `medsim train` reads: a split JSON (a run's split.json), a dataset folder or CSV datalist "
                   "in any layout (HAM10000, ISIC 2019, class folders, CSV, DICOM, NIfTI), or a folder of images.")
@click.option("--split", default="training", show_default=True, help="Which split of the JSON to index.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Index folder.")
@click.option("--kind", type=click.Choice(["flat", "ivfpq", "hnsw", "ondisk", "sharded"]), default="flat",
              show_default=True, help="flat: exact; ivfpq, hnsw: approximate, in memory; ondisk: IVF lists in a "
              "memory-mapped .ivfdata file (collections larger than RAM); sharded: IVF shards searched in parallel.")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
              help="ivfpq: re-rank REFINE·k PQ candidates by exact distance (keeps the full vectors; 0: off).")
@click.option("--nlist", type=click.IntRange(min=1), default=None,
              help="IVF kinds: inverted lists (default: about 4·sqrt(cases)).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="IVF kinds: lists searched per query by default (saved with the index; CaseIndex default 16).")
@click.option("--codes", type=click.Choice(["flat", "pq"]), default=None,
              help="ondisk, sharded: store the float vectors (flat, the default; exact when every list is probed) or "
                   "PQ codes (dim/2 bytes per case).")
@click.option("--shards", type=click.IntRange(min=1), default=None, help="sharded: number of shards (default 4).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "ort-cuda", "ort-cpu", "openvino"]), default="auto",
              show_default=True, help="auto: TensorRT on a GPU, else the fastest CPU engine the export timed.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="bf16: OpenVINO's bf16 mode (CPUs with bf16); int8: the export's INT8 model (onnxruntime or "
                   "OpenVINO, CPU); search then uses it too.")
@click.option("--shareable", is_flag=True,
              help="Write no cases.local.json (each case token's image path on this machine) next to the index.")
@_threads_option(torch=False)
def index_build(model_dir: Path, data: Path, split: str, out: Path, kind: str, refine: int, nlist: int | None,
                nprobe: int | None, codes: str | None, shards: int | None, backend: str, precision: str,
                shareable: bool) -> None:
    """Embed the cases of DATA and save a faiss index of case tokens, labels and hashed groups (no file name or
    patient id in it). The image paths go to OUT/cases.local.json, for this machine only (--shareable: not at
    all)."""
    from medsim.deploy.tasks import build_index

    extra = {k: v for k, v in (("refine", refine or None), ("nlist", nlist), ("nprobe", nprobe), ("codes", codes),
                               ("shards", shards)) if v is not None}
    r = build_index(model_dir, data, out, split=split, kind=kind, backend=backend, progress=sys.stderr.isatty(),
                    precision=precision, local_paths=not shareable, **extra)
    click.echo(f"indexed {r['cases']} cases ({r['kind']}, {r['backend']}) -> {r['index']}")
    if r.get("local_paths"):
        click.echo(f"image paths of the cases (keep on this machine; not in the index): {r['local_paths']}")


_BACKEND = click.Choice(["auto", "tensorrt", "ort-cuda", "ort-cpu", "openvino"])


class _SearchBackendOption(click.Option):
    """``--backend NAME``, or ``--backend triton URL``: a Triton server's address as the next argument (stored as
    ``triton=URL``, which may also be given as one word)."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for opt in self.opts:  # click has no public hook for a value of two words: wrap the option's handler
            handler = parser._long_opt.get(opt)
            if handler is not None:
                def process(value: str, state: Any, store: Any = handler.process) -> None:
                    if value == "triton" and state.rargs and not state.rargs[0].startswith("-"):
                        value = f"triton={state.rargs.pop(0)}"
                    store(value, state)

                handler.process = process


def _search_backend(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in _BACKEND.choices:
        return value
    if value.startswith("triton="):
        from medsim.deploy.triton_client import parse_url
        from medsim.runtime.errors import DeployError

        try:
            parse_url(value[len("triton="):])
        except DeployError as e:
            raise click.BadParameter(str(e)) from None
        return value
    if value == "triton":
        raise click.BadParameter("triton needs the server's URL: --backend triton http://HOST:8000")
    raise click.BadParameter(f"'{value}' is not one of {', '.join(_BACKEND.choices)}, triton URL")


@cli.command("search")
@click.option("--index", "index_dir", type=click.Path(path_type=Path, exists=True), required=True,
              help="Index folder (or its case_index.json).")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--data", "queries", type=click.Path(path_type=Path, exists=True), default=None,
              help="Queries from a split JSON (with --split; their labels colour the results and give R@K), a "
                   "dataset folder/CSV or a folder of images, instead of IMAGE arguments.")
@click.option("--split", default="test", show_default=True, help="Split of --data to query with.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Export folder (default: the one the index was built with).")
@click.option("--html", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the results as pictures: an HTML page, or one PNG grid when the name ends in .png.")
@click.option("--backend", cls=_SearchBackendOption, callback=_search_backend, default="auto", show_default=True,
              metavar="[auto|tensorrt|ort-cuda|ort-cpu|openvino|triton URL]",
              help="Where queries are embedded: a local backend, or a Triton server serving the export's "
                   "OUT/triton repository (triton http://HOST:8000).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default=None,
              help="Model to embed queries with (default: the one the index was built with).")
@click.option("--exclude-self", is_flag=True,
              help="Leave-one-out: drop a query's own case from its hits (by case id; queries from --data).")
@click.option("--recheck/--no-recheck", default=True, show_default=True,
              help="With --precision bf16/int8 against an index built at fp32: embed again in fp32 the queries "
                   "whose k-th and (k+1)-th hits are closer than the margin the export calibrated, so the top-k is "
                   "fp32's (the share rechecked is printed).")
@_threads_option(torch=False)
def search(index_dir: Path, images: tuple[Path, ...], queries: Path | None, split: str, k: int,
           model_dir: Path | None, html: Path | None, backend: str, precision: str | None,
           exclude_self: bool, recheck: bool) -> None:
    """Find the K most similar indexed cases for each IMAGE (or each case of --data).

    Queries and cases are shown by their opaque case tokens (c-<16 hex>), never by file name; an index's
    cases.local.json maps its tokens to image paths on the machine that built it. R@K of --data queries: gallery =
    the index, queries = the split; with --exclude-self a query's own case is not counted, which is the
    leave-one-out protocol of `medsim evaluate` when the index holds the same split."""
    from medsim.deploy.tasks import case_names, read_cases, recall_from_hits, search_images

    if bool(images) == (queries is not None):
        raise click.UsageError("give query IMAGEs or --data (not both)")
    if exclude_self and queries is None:
        raise click.UsageError("--exclude-self needs --data (queries whose case ids the index can hold)")
    labels = None
    if queries is not None:
        cases = read_cases(queries, split=split)
        images = tuple(Path(c["uri"]) for c in cases)
        labels = [c.get("label") for c in cases]
        ids = [c["id"] for c in cases]
    else:
        ids = case_names(images)
    hits = search_images(index_dir, images, k=k, model_dir=model_dir, html=html, labels=labels, backend=backend,
                         precision=precision, query_ids=ids, exclude_self=exclude_self, recheck=recheck)
    if len(images) <= 50:
        for n, (qid, row) in enumerate(zip(ids, hits), start=1):
            click.echo(f"query {n} ({qid})")
            click.echo(f"  {'rank':>4}  {'score':>7}  {'label':<12} case")
            for r, h in enumerate(row, start=1):
                click.echo(f"  {r:>4}  {h.score:7.4f}  {str(h.record.get('label')):<12} {h.record.get('id', h.id)}")
    if hits.margin is not None:
        click.echo(f"fp32 recheck: {len(hits.rechecked)} of {len(hits)} queries re-embedded in fp32 (k-th and "
                   f"(k+1)-th hits within {hits.margin:.2g}, the export's calibrated margin)"
                   + ("; that is most of them: for this model --precision fp32 alone costs about as much or less"
                      if len(hits) >= 10 and len(hits.rechecked) > len(hits) / 2 else ""))
    elif hits.recheck_note:
        click.echo(hits.recheck_note)
    recall = recall_from_hits(labels or [], hits, sorted({1, min(k, 5), k}))
    if recall:
        n = sum(lab is not None for lab in labels or [])
        protocol = ("leave-one-out: a query's own case excluded" if exclude_self else
                    "a query that is in the index counts as its own hit; --exclude-self for leave-one-out")
        click.echo("  ".join(f"{name} {v:.4f}" for name, v in recall.items()) +
                   f"  ({n} labelled queries, k={k}; gallery = the index, queries = {queries} '{split}'; {protocol})")
    if html:
        bare = not labels or all(lab is None for lab in labels)
        click.echo(f"wrote {html}" + (" (unlabelled queries: hits not marked right/wrong)" if bare else ""))


def _threshold(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    if value == "otsu":
        return value
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise click.BadParameter(f"'otsu' or a number in [0, 1], got '{value}'")
    return v


@cli.command("localize")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--masks", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of ground-truth masks named <stem>_segmentation.png, <stem>.png or (3D) "
                   "<stem>_label.nii.gz / <stem>.nii.gz: adds a Dice/IoU table.")
@click.option("--mask-file", "mask_files", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ground-truth mask of each IMAGE, in order (instead of --masks; 3D: a label map, > 0 = lesion).")
@click.option("--threshold", default="otsu", show_default=True, callback=_threshold,
              help="'otsu' or a number in [0, 1].")
@click.option("--backend", type=_BACKEND, default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
              help="bf16: OpenVINO's bf16 mode (CPUs with bf16); int8: the export's INT8 model (onnxruntime or "
                   "OpenVINO, CPU).")
@click.option("--shareable", is_flag=True,
              help="Write no OUT/cases.local.json (which input each output name is).")
@_threads_option(torch=False)
def localize(model_dir: Path, images: tuple[Path, ...], out: Path, masks: Path | None, mask_files: tuple[Path, ...],
             threshold: str | float, backend: str, precision: str, shareable: bool) -> None:
    """Lesion masks, boxes and overlays from the model's attention for each IMAGE (a 2D image, or for 3D models a
    NIfTI volume or DICOM series folder). Outputs are named by each image's case token (c-<16 hex>), never by its
    file name; OUT/cases.local.json says which input each token is (--shareable: not written)."""
    from medsim.deploy.tasks import file_stem, localize_images

    if masks is not None and mask_files:
        raise click.UsageError("give --masks DIR or --mask-file (one per image), not both")
    gts: list[Path | None] | None = list(mask_files) or None
    if gts is not None and len(gts) != len(images):
        raise click.UsageError(f"{len(gts)} --mask-file for {len(images)} image(s); give one per image")
    if masks is not None:
        gts = []
        for img in images:
            stem = file_stem(img)
            cands = [masks / f"{stem}{suf}" for suf in ("_segmentation.png", ".png", "_label.nii.gz", "_seg.nii.gz",
                                                         ".nii.gz")]
            gts.append(next((c for c in cands if c.is_file() and c.resolve() != img.resolve()), None))
    r = localize_images(model_dir, images, out, masks=gts, threshold=threshold, backend=backend,
                        progress=sys.stderr.isatty(), precision=precision, local_paths=not shareable)
    click.echo(f"localized {r['images']} image(s) -> {r['out']}")
    if len(r["names"]) <= 50:
        for n, name in enumerate(r["names"], start=1):
            click.echo(f"  image {n}: {name}_*")
    if "dice" in r:
        click.echo(f"Dice {r['dice']:.3f}  IoU {r['iou']:.3f}  pointing {r['pointing']:.3f}  box hit {r['box_hit']:.3f}"
                   f"  ({r['scored']} with masks)")
    if r.get("empty_masks"):
        click.echo(f"{r['empty_masks']} image(s) have an empty ground-truth mask: not scored")


def _point(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float, float]:
    try:
        parts = [float(v) for v in value.replace(" ", "").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(map(math.isfinite, parts)):
        raise click.BadParameter(f"three numbers x,y,z, got '{value}'")
    return parts[0], parts[1], parts[2]


@cli.command("landmark")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="Export of a SAM run (bundles/ct_sam).")
@click.option("--template", type=click.Path(path_type=Path, exists=True), required=True,
              help="The volume the point is in (NIfTI file or DICOM series folder).")
@click.option("--point", required=True, callback=_point, help="x,y,z of the landmark in the template.")
@click.option("--unit", type=click.Choice(["mm", "voxel"]), default="mm", show_default=True,
              help="mm: world RAS coordinates (what a viewer shows); voxel: indices of the template file's array.")
@click.argument("targets", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write landmarks.json and a picture per target (<case token>_landmark.png) here.")
@click.option("--backend", type=_BACKEND, default="auto", show_default=True)
@click.option("--crop", is_flag=True, default=False,
              help="Search only the model's training-size centre crop of each volume (default: the whole volume).")
@_threads_option(torch=False)
def landmark(model_dir: Path, template: Path, point: tuple[float, float, float], unit: str, targets: tuple[Path, ...],
             out: Path | None, backend: str, crop: bool) -> None:
    """Find a template landmark in each TARGET volume with an exported SAM model (pixel-wise anatomical embeddings;
    torch-free): the most similar point, its world (mm) and voxel coordinates and the similarity. The model embeds
    each whole volume (resampled to its training spacing); targets are listed by case token (c-<16 hex>), never by
    file name."""
    import json

    from medsim.deploy.landmark import find_landmarks

    rows = find_landmarks(str(model_dir), str(template), point, [str(t) for t in targets], unit=unit,
                          backend=backend, pictures=None if out is None else str(out), crop=crop)
    click.echo(f"template point: {', '.join(f'{v:.1f}' for v in rows[0]['template_mm'])} mm (RAS)")
    click.echo(f"  {'target':<20} {'found (mm, RAS)':<28} {'found (voxel)':<26} similarity")
    for r in rows:
        mm = ", ".join(f"{v:.1f}" for v in r["point_mm"])
        vox = ", ".join(f"{v:.1f}" for v in r["point_voxel"])
        click.echo(f"  {r['name']:<20} {mm:<28} {vox:<26} {r['score']:.3f}")
    if out is not None:
        from medsim.errors import atomic_write_text

        atomic_write_text(out / "landmarks.json", json.dumps({"unit_in": unit, "targets": rows}, indent=1))
        click.echo(f"wrote {out}/landmarks.json and {len(rows)} picture(s)")


def _medsim_cause(e: BaseException) -> MedsimError | OSError | None:
    """The bad-input error (a MedsimError, or an OSError naming a file) inside an exception that MONAI's config
    machinery or ignite wrapped around it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MedsimError) or isinstance(e, OSError) and getattr(e, "filename", None):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI, turning input errors into one-line messages and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("MEDSIM_DEBUG"))
    try:
        rv = cli.main(args=args, prog_name="medsim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MedsimError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a path the user gave cannot be read or written (permissions, a file for a folder, ...)
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    except Exception as e:  # a bug, not bad input: say so, keep the traceback behind --debug
        if debug:
            raise
        cause = _medsim_cause(e)  # bad input raised inside MONAI's config machinery / ignite comes wrapped
        if isinstance(cause, OSError):
            click.echo(f"error: {cause.filename}: {cause.strerror or cause}", err=True)
            sys.exit(2)
        if cause is not None:
            click.echo(f"error: {cause}", err=True)
            sys.exit(2)
        click.echo(f"internal error: {type(e).__name__}: {e}\n(rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
