"""Bundle-facing functions: datalists for a run, the end-of-training test evaluation, ``medsim train``/``evaluate``.

Bundle configs hold wiring; the logic they call lives here (one call per ``$`` expression).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medsim.errors import MedsimError, atomic_path, atomic_write_text

__all__ = ["bundle_datalists", "datalists_from_split", "evaluate_checkpoint", "finish_training", "train_bundle",
           "evaluate_run", "parse_overrides", "embed_dataset", "evaluate_network", "check_writable_dir"]

logger = logging.getLogger(__name__)


def bundle_datalists(dataset_dir: str | os.PathLike | None, output_dir: str | os.PathLike, *,
                     by: str = "lesion_id", fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                     lenient: bool = False, layout: str = "auto", max_items: int | None = None,
                     **source_options: Any) -> dict[str, Any]:
    """Check ``dataset_dir`` (the embedded sample's dermoscopy set when empty), split it by ``by`` and save the
    split to ``output_dir/split.json``; a run directory that already has one reuses it (reproducible resumes).
    ``source_options`` go to the reader (e.g. ``label_column="binary_label"`` for a CSV datalist: NIH CXR).

    Returns ``{"training", "validation", "test": [items with "index"], "classes": [...], "kind": str}``.
    ``max_items`` keeps a stratified random subset (for quick runs and benchmarks), drawn before splitting.
    """
    from medsim.data.prepare import load_checked
    from medsim.data.splits import check_reused_split, grouping_key, load_split, save_split, split_items

    out = Path(output_dir)
    split_file = out / "split.json"
    if not dataset_dir:
        from medsim.data.sample import ensure_sample

        dataset_dir = ensure_sample() / "derm"
    if split_file.is_file():
        doc = load_split(split_file)
        check_reused_split(split_file, doc, source=dataset_dir, by=by, max_items=max_items)
        logger.debug("reusing split %s", split_file)  # evaluated more than once per run by MONAI's workflow
    else:
        src, _ = load_checked(dataset_dir, layout=layout, lenient=lenient, report_path=out / "skipped.json",
                              **{k: v for k, v in source_options.items() if v is not None})
        items = src.items
        if max_items is not None and len(items) > max_items:
            items = _stratified_subset(items, max_items, seed)
        grouped_by = grouping_key(items, by)  # "image" when the layout has no lesion/patient column (warned)
        splits = split_items(items, by=grouped_by, fractions=fractions, seed=seed)
        # "by" is what was asked (a resume asks the same), "grouped_by" the grouping the split really kept
        meta = {"source": str(Path(dataset_dir).resolve()), "layout": src.layout, "kind": src.kind, "by": by,
                "grouped_by": grouped_by,
                "fractions": list(fractions), "seed": seed, "classes": src.classes, "skipped": len(src.bad),
                "max_items": max_items}
        save_split(splits, split_file, dataset_dir=src.root, meta=meta)
        doc = load_split(split_file)
    return datalists_from_split(doc)


#: case metadata a split keeps and the datalists pass on (hashed patient/study tokens, view, laterality,
#: follow-up: what MedAug's positive-pair criteria read); a key is passed on only when every case has it, so
#: batches collate
CASE_METADATA = ("patient", "study", "view", "laterality", "follow_up")


def datalists_from_split(split: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A split document (or its file) as the datalists a bundle trains on: ``{"training", "validation", "test":
    [{"image", "label", "index", "mask"?, *CASE_METADATA?}], "classes", "kind"}`` (plain data: nothing in it is
    evaluated)."""
    from medsim.data.splits import load_split

    doc = split if isinstance(split, dict) else load_split(split)
    meta = doc.get("meta") or {}
    result: dict[str, Any] = {"classes": meta.get("classes", []), "kind": meta.get("kind", "")}
    cases = [it for key in ("training", "validation", "test") for it in doc.get(key, [])]
    keep = [k for k in CASE_METADATA if cases and all(isinstance(it.get(k), (str, int)) for it in cases)]
    for key in ("training", "validation", "test"):
        result[key] = [{"image": it["image"], "label": it["label"], "index": i,
                        **({"mask": it["mask"]} if "mask" in it else {}), **{k: str(it[k]) for k in keep}}
                       for i, it in enumerate(doc.get(key, []))]
    return result


def _stratified_subset(items: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` items keeping whole groups and class proportions (sklearn's StratifiedGroupKFold on one fold)."""
    from medsim.data.splits import split_items

    frac = n / len(items)
    keep = split_items(items, by="group" if any("group" in it for it in items) else "id",
                       fractions=(1 - frac, 0.0, frac), seed=seed + 101)["test"]
    return keep


def evaluate_checkpoint(network: torch.nn.Module, loader: Any, device: str | torch.device, *, seed: int = 0
                        ) -> dict[str, float]:
    """Embed a loader with ``network`` and compute NMI/AMI, R@1/2/4/8, MAP@R, P@1, class-balanced R@1 and MAP@R
    — and, for a network with a ``logits`` head, accuracy, balanced accuracy and macro-F1 (one pass)."""
    from medsim.engines.subspaces import loader_outputs
    from medsim.metrics.classification import classification_metrics
    from medsim.metrics.retrieval import class_balanced_retrieval, evaluate_embeddings, usable_ks

    out = loader_outputs(network, loader, device, keys=("embedding", "logits"))
    emb, lab = out["embedding"], out["label"]
    res = evaluate_embeddings(emb, lab, ks=usable_ks(len(emb)), seed=seed)
    res.update(class_balanced_retrieval(emb, lab))
    if "logits" in out:
        res.update(classification_metrics(lab, out["logits"]))
    return res


def finish_training(output_dir: str | os.PathLike, network: torch.nn.Module, test_loader: Any,
                    device: str | torch.device, *, name: str = "run", seed: int = 0,
                    selected_by: str = "val_nmi") -> dict[str, float]:
    """After training: load ``best.pt`` (chosen on the validation metric ``selected_by``), evaluate on the test
    split, write ``eval_test.json`` / ``eval_test.md`` and print NMI and R@1 (and accuracy for classifiers)."""
    from medsim.nn.collectives import is_main_process

    if not is_main_process():  # several processes: rank 0 evaluates and writes; the others wait at the barrier
        return {}
    from medsim.engines.reports import write_eval_report

    out = Path(output_dir)
    best = out / "best.pt"
    if best.is_file():
        _load_weights(network, best)
    res = evaluate_checkpoint(network, test_loader, device, seed=seed)
    write_eval_report(out, "test", best, res, name)
    extra = (f"  accuracy {res['accuracy']:.4f}  balanced accuracy {res['balanced_accuracy']:.4f}"
             if "accuracy" in res else "")
    print(f"test NMI {res['nmi']:.4f}  R@1 {res['R@1']:.4f}{extra}  (best checkpoint by {selected_by}; {out})")
    return res


def _load_weights(network: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load ``checkpoint``'s ``network`` state_dict (weights only: nothing in the file runs) into ``network``."""
    from medsim.engines.runs import load_weights

    load_weights(network, checkpoint)


def _has_expression(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith(("$", "%"))
    if isinstance(value, dict):
        return any(_has_expression(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_expression(v) for v in value)
    return False


def parse_overrides(pairs: Sequence[str], *, allow_expressions: bool = False) -> dict[str, Any]:
    """``["train#trainer#max_epochs=1", "lr=1e-3"]`` -> ``{id: value}``; values parsed as JSON when they can be.

    A value that MONAI would evaluate as Python (``$expr``) or load from another file (``%file#id``) is refused
    unless ``allow_expressions`` (the CLI's ``--allow-expressions``): ``-o`` is for values.
    """
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise MedsimError(f"override '{p}' is not of the form id=value (e.g. train#trainer#max_epochs=1)")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
        if _has_expression(out[k.strip()]) and not allow_expressions:
            raise MedsimError(f"-o {p}: the value is a MONAI expression ($...) or macro (%...), which runs code; "
                              "give a plain value, or pass --allow-expressions if you mean to run it")
    return out


def _metadata_file(bundle: Path) -> Path:
    """The bundle's ``configs/metadata.json``."""
    return bundle / "configs" / "metadata.json"


def _train_files(bundle: Path) -> list[Path]:
    """The config files of a bundle's training, in MONAI's layering order (later files override earlier ids).

    A bundle's ``metadata.json`` may list them as ``"config_files": {"train": [...]}`` (paths relative to
    ``configs/``), e.g. ``isic_abe``: ``["../../isic_dsl/configs/train.json", "train.json"]`` — exactly the list MONAI's
    runner is given (``python -m monai.bundle run --config_file "['bundles/isic_dsl/configs/train.json',
    'bundles/isic_abe/configs/train.json']"``); without it, ``configs/train.json`` alone.
    """
    cfg = bundle / "configs"
    if not (cfg / "train.json").is_file():
        raise MedsimError(f"{bundle}: not a bundle (no configs/train.json)")
    meta = _metadata_file(bundle)
    listed = None
    if meta.is_file():
        try:
            listed = (json.loads(meta.read_text(encoding="utf-8")).get("config_files") or {}).get("train")
        except (json.JSONDecodeError, AttributeError) as e:
            raise MedsimError(f"{meta}: not a metadata object with an optional config_files#train list ({e})") from e
    if listed is None:
        return [cfg / "train.json"]
    if not isinstance(listed, list) or not listed or not all(isinstance(f, str) for f in listed):
        raise MedsimError(f"{meta}: config_files#train must be a list of file names relative to {cfg}")
    files = [(cfg / f).resolve() for f in listed]
    for f in files:
        if not f.is_file():
            raise MedsimError(f"{meta}: config_files#train names {f}, which does not exist")
    return files


#: config files of a bundle that are not training variants
NOT_VARIANTS = ("train", "metadata", "evaluate", "inference", "logging", "multi_gpu_train")
#: the model-zoo file layered last when ``torchrun`` starts the training on several processes
MULTI_GPU = "multi_gpu_train.json"


def bundle_variants(bundle: str | os.PathLike) -> list[str]:
    """The variants of a bundle: every ``configs/*.json`` layered on its training config (``classifier``, ``mml``,
    ``nodiv`` ...), found in the folder rather than listed anywhere."""
    return sorted(p.stem for p in (Path(bundle) / "configs").glob("*.json") if p.stem not in NOT_VARIANTS)


def _multi_gpu_file(bundle: Path) -> Path:
    """The bundle's ``configs/multi_gpu_train.json`` (the model-zoo convention), or the one its metadata names
    (``config_files#multi_gpu_train``, relative to ``configs/``: bundles layered on another share its file)."""
    meta = _metadata_file(bundle)
    named = None
    if meta.is_file():
        try:
            named = (json.loads(meta.read_text(encoding="utf-8")).get("config_files") or {}).get("multi_gpu_train")
        except (json.JSONDecodeError, AttributeError) as e:
            raise MedsimError(f"{meta}: not a metadata object with an optional config_files#multi_gpu_train file "
                              f"name ({e}); fix the JSON") from e
        if named is not None and not isinstance(named, str):
            raise MedsimError(f"{meta}: config_files#multi_gpu_train must be one file name relative to "
                              f"{bundle / 'configs'}, got {named!r}")
    path = (bundle / "configs" / (named or MULTI_GPU)).resolve()
    if not path.is_file():
        raise MedsimError(f"{bundle}: no configs/{MULTI_GPU} ({path} does not exist), so it cannot train on "
                          "several processes (`--nproc 1`, or add the file: see "
                          "bundles/isic_dsl/configs/multi_gpu_train.json)")
    return path


def _bundle_files(bundle: Path, variant: str | None) -> list[str]:
    files = [str(f) for f in _train_files(bundle)]
    if variant:
        v = bundle / "configs" / f"{variant}.json"
        if variant in NOT_VARIANTS or not v.is_file():
            import difflib

            options = bundle_variants(bundle)
            close = difflib.get_close_matches(variant, options, n=1)
            raise MedsimError(f"{bundle}: no variant '{variant}' (available: {', '.join(options)})"
                              + (f"; did you mean '{close[0]}'?" if close else ""))
        files.append(str(v))
    from medsim.engines.distributed import launched_by_torchrun

    if launched_by_torchrun():
        files.append(str(_multi_gpu_file(bundle)))
    return files


def train_bundle(bundle: str | os.PathLike, *, variant: str | None = None, dataset_dir: str | None = None,
                 output_dir: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a bundle's training workflow (initialize → run → finalize) through MONAI's ``ConfigWorkflow``.

    Everything that can be checked is checked before anything is written, so a refused run changes nothing in an
    existing run folder: the overrides, ``max_epochs``, the output folder, a resumed run's split (same data),
    ``last.pt`` (a weights-only checkpoint) and its network (the same arguments as ``run.json`` recorded). Then
    ``run.json`` (the plain record ``export``/``evaluate`` rebuild the network from) and ``config.json`` (the
    config as trained, for people to read: never parsed again) are written and training runs.
    """
    from monai.bundle import ConfigWorkflow

    from medsim.engines.distributed import barrier, init_distributed, is_main_process
    from medsim.engines.runs import RUN_RECORD, load_checkpoint, record_from_parser

    init_distributed()  # under torchrun: join the group before the config builds samplers and DDP (no-op otherwise)
    bundle = Path(bundle)
    ov = dict(overrides or {})
    _check_overrides(bundle, variant, ov)
    user_ov = dict(ov)
    ov["bundle_root"] = str(bundle.resolve())
    if dataset_dir is not None:
        ov["dataset_dir"] = str(Path(dataset_dir).resolve())
    if output_dir is not None:
        ov["output_dir"] = str(Path(output_dir).resolve())
    if not is_main_process():  # several processes: progress bars and TensorBoard on rank 0 only
        ov["train#output_handlers"] = []
    quiet = logging.getLogger("monai.bundle.workflows")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # medsim's CLI configures logging itself; skip the bundle's logging.conf
    try:
        wf = ConfigWorkflow(config_file=_bundle_files(bundle, variant),
                            meta_file=str(_metadata_file(bundle)), workflow_type="train",
                            logging_file=False, **ov)
    finally:
        quiet.setLevel(level)
    _check_max_epochs(wf.parser)
    out = Path(wf.parser.get_parsed_content("output_dir"))
    check_writable_dir(out, what="run folder")
    if bool(wf.parser.get_parsed_content("resume")) and (out / "last.pt").is_file():
        load_checkpoint(out / "last.pt")  # refuse a doctored/corrupt checkpoint before touching the folder
    t0 = time.time()
    wf.initialize()
    if not is_main_process():  # several processes: rank 0 makes the split and writes the run record first
        barrier()
    if "datalists" in wf.parser:  # the split (made, or reused and checked against the data) before any write
        wf.parser.get_parsed_content("datalists")
    record = record_from_parser(wf.parser, bundle=bundle, variant=variant, overrides=user_ov)  # resolves the split
    old = out / RUN_RECORD
    if old.is_file() and (out / "last.pt").is_file():
        _check_same_network(old, record)
    if is_main_process():
        atomic_write_text(old, json.dumps(record, indent=1))
        config = dict(wf.parser.get())
        config["dataset_dir"] = "(kept in split.local.json: folder names can carry patient names)"
        for key, value in user_ov.items():  # never save an expression into a run folder: record what it resolved to
            if _has_expression(value):
                config = _set_id(config, key, record["overrides"].get(key))
        atomic_write_text(out / "config.json", json.dumps(config, indent=1, default=str))
        barrier()
    logged = _epochs_logged(out)
    wf.run()
    wf.finalize()
    # 0 on a run folder that was already complete (its last.pt at max_epochs: the trainer warned and stopped)
    summary = {"output_dir": str(out), "seconds": round(time.time() - t0, 1),
               "epochs_trained": _epochs_logged(out) - logged}
    test = out / "eval_test.json"
    if test.is_file():
        summary.update(json.loads(test.read_text()))
    return summary


def run_torchrun(bundle: str | os.PathLike, variant: str | None, overrides: dict[str, Any], nproc: int,
                 cli_args: Sequence[str]) -> None:
    """``medsim train --nproc N``: check what can be checked here (the overrides, the bundle's
    ``multi_gpu_train.json``), then run ``python -m torch.distributed.run --standalone --nproc_per_node N -m
    medsim.cli <cli_args>`` and wait. Each worker is an ordinary ``medsim train`` that finds torchrun's environment
    (:func:`medsim.engines.distributed.launched_by_torchrun`) and layers ``multi_gpu_train.json``.

    Raises:
        MedsimError: a refused override, a bundle without ``multi_gpu_train.json``, or workers that failed (their
            own messages are printed above; the exit code is torchrun's).
    """
    import subprocess
    import sys

    bundle = Path(bundle)
    _check_overrides(bundle, variant, dict(overrides))
    _multi_gpu_file(bundle)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
           "-m", "medsim.cli", *cli_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    logger.info("starting %d training processes: %s", nproc, " ".join(cmd[1:]))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise MedsimError(f"training on {nproc} processes failed (torchrun exit code {rc}); the workers' messages "
                          "are above")


def _set_id(config: dict[str, Any], config_id: str, value: Any) -> dict[str, Any]:
    """``config`` with the nested id ``a#b#0`` set to ``value`` (a copy along the path)."""
    keys = config_id.split("#")
    root = dict(config)
    node: Any = root
    for k in keys[:-1]:
        nxt = node[int(k)] if isinstance(node, list) else node.get(k)
        nxt = list(nxt) if isinstance(nxt, list) else dict(nxt or {})
        if isinstance(node, list):
            node[int(k)] = nxt
        else:
            node[k] = nxt
        node = nxt
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return root


def _check_max_epochs(parser: Any) -> None:
    """``train#trainer#max_epochs`` must be a whole number >= 1 (0, -1 or a word would train nothing or fail late)."""
    try:
        v = parser.get_parsed_content("train#trainer#max_epochs")
    except Exception as e:  # noqa: BLE001 - MONAI wraps a bad reference/expression
        raise MedsimError(f"train#trainer#max_epochs: cannot be read ({type(e).__name__}: {e})") from e
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MedsimError(f"train#trainer#max_epochs={v!r}: expects a whole number of epochs >= 1 "
                          "(e.g. -o max_epochs=12)")


def check_writable_dir(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Check that ``folder`` is, or can be created as, a folder medsim can write: its nearest existing ancestor
    is a folder and a probe file can be created there (removed at once). Nothing is left behind.

    Raises:
        MedsimError: naming ``folder`` and the real reason (a file in the way, permission denied, read-only file
            system, no space left).
    """
    import tempfile

    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise MedsimError(f"{folder}: cannot be the {what}: {probe_dir} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".medsim-probe", dir=probe_dir)
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        raise MedsimError(f"{folder}: cannot write the {what} there ({e.strerror or e})") from e
    return folder


def _check_same_network(record_file: Path, record: dict[str, Any]) -> None:
    """A resumed run must build the network its checkpoint was trained with."""
    try:
        old = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MedsimError(f"{record_file}: cannot be read ({e}); train into a new --output directory") from e
    if isinstance(old, dict) and old.get("network") != record["network"]:
        diff = sorted(k for k in set(old.get("network") or {}) | set(record["network"])
                      if (old.get("network") or {}).get(k) != record["network"].get(k))
        raise MedsimError(f"{record_file.parent}: this run folder holds a run of another network (differs in "
                          f"{', '.join(diff)}); train into a new directory (--output DIR) or delete this one")


def _epochs_logged(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir/metrics.jsonl`` (one line each, written by ``MetricsLogger``)."""
    f = run_dir / "metrics.jsonl"
    return sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip()) if f.is_file() else 0


def _check_overrides(bundle: Path, variant: str | None, overrides: dict[str, Any]) -> None:
    """Each ``-o ID=VALUE`` names an id of the bundle's config, and a number / flag stays one (a typo would
    otherwise surface as an error deep inside training)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(bundle, variant)))
    problems = []
    for key, value in overrides.items():
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if key not in parser and parent is not None and parent in parser and isinstance(parser[parent], dict):
            continue  # a new key in an existing section (MONAI allows it, e.g. handlers#4#_disabled_)
        if key not in parser:
            import difflib

            ids = [k for k in parser.get() if isinstance(k, str)] if isinstance(parser.get(), dict) else []
            close = difflib.get_close_matches(key, ids, n=1)
            problems.append(f"-o {key}: no such id in {bundle}" + (f" (did you mean '{close[0]}'?)" if close else ""))
            continue
        old = parser[key]
        if value is None:  # null switches an optional knob off (e.g. -o split_quantile=null)
            continue
        expr = isinstance(value, str) and value[:1] in ("$", "@", "%")
        if isinstance(old, bool) and not (isinstance(value, bool) or expr):
            problems.append(f"-o {key}={value!r}: expects true or false")
        elif isinstance(old, (int, float)) and not isinstance(old, bool) and not expr and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"-o {key}={value!r}: expects a number (it is {old!r} in the bundle)")
    if problems:
        raise MedsimError("; ".join(problems))


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "test", checkpoint: str = "best.pt",
                 seed: int = 0) -> dict[str, float]:
    """Evaluate a finished run on one split of its own ``split.json``; writes ``eval_<split>.json`` and ``.md``.

    The network and eval preprocessing are rebuilt from the run's ``run.json`` (plain values, medsim classes only)
    and the weights loaded weights-only: nothing in the run folder is executed. A run of a label-free bundle
    (``run.json#evaluation``: ``ct_sam``, ``ct_pgl``) gets its own evaluation on fixed view pairs of the split's
    volumes (:func:`medsim.engines.view_pairs.evaluate_pairs_run`: point matching, or the method's loss) instead of
    retrieval metrics, which need labels.

    Raises:
        MedsimError: the run folder is incomplete, or its data are unlabelled and it records no label-free
            evaluation (retrieval and clustering scores would be computed on label -1).
    """
    from medsim.engines.runs import build_spec, load_run_record

    run = Path(run_dir)
    for f in (run / checkpoint, run / "split.json"):
        if not f.is_file():
            raise MedsimError(f"{f}: not found — is {run} a finished `medsim train` run directory?")
    record = load_run_record(run)
    if record.get("evaluation") is not None:
        from medsim.engines.view_pairs import evaluate_pairs_run

        return evaluate_pairs_run(run, record, split=split, checkpoint=checkpoint)
    datalists = datalists_from_split(run / "split.json")
    cases = [it for key in ("training", "validation", "test") for it in datalists[key]]
    if cases and all(it["label"] == -1 for it in cases):
        raise MedsimError(f"{run}: its data are unlabelled (every label in split.json is -1), so retrieval and "
                          "clustering metrics (NMI, R@k) would mean nothing, and its run.json records no label-free "
                          f"evaluation (bundle {record.get('bundle')!r}); runs of ct_sam / ct_pgl trained with this "
                          "medsim record one — re-train to evaluate")
    network = build_spec(record["network"], f"{run / 'run.json'}#network")
    transform = build_spec(record["eval_preprocessing"], f"{run / 'run.json'}#eval_preprocessing")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_network(network.to(device), run, datalists, transform, device,
                            split=split, checkpoint=checkpoint, batch_size=int(record.get("eval_batch_size", 64)),
                            seed=seed)


def evaluate_network(network: torch.nn.Module, run_dir: str | os.PathLike, datalists: dict[str, Any], transform: Any,
                     device: str | torch.device, *, split: str = "test", checkpoint: str = "best.pt",
                     batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Load ``run_dir/checkpoint`` into ``network``, embed one split and write ``eval_<split>.json`` / ``.md``
    (used by ``medsim evaluate``; the bundle's ``evaluate.json`` is the same evaluation as MONAI handlers)."""
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.engines.reports import split_key, write_eval_report

    run = Path(run_dir)
    key = split_key(split)
    ckpt = run / checkpoint
    if not ckpt.is_file():
        raise MedsimError(f"{ckpt}: checkpoint not found")
    items = datalists[key]
    if not items:
        raise MedsimError(f"split '{split}' of {run / 'split.json'} is empty")
    _load_weights(network, ckpt)
    loader = DataLoader(make_dataset(items, transform), batch_size=batch_size, num_workers=0)
    res = evaluate_checkpoint(network, loader, device, seed=seed)
    write_eval_report(run, key, ckpt, res)
    return res


def embed_dataset(network: torch.nn.Module, checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike | None,
                  transform: Any, out_file: str | os.PathLike, *, device: str | torch.device = "cpu",
                  batch_size: int = 64, inferer: Any = None) -> Path:
    """Embed every usable image of ``dataset_dir`` (default: the embedded sample) with a trained checkpoint,
    through ``inferer`` (a MONAI ``Inferer``, e.g. the bundle's ``inference.json#inferer``; default: the network
    called on the batch).

    Writes ``out_file`` (.npz, atomically): ``embedding`` (N, D), ``attention`` (N, 1, h, w), ``label`` (N,),
    ``id`` (N,) image ids, ``classes``. Returns the path.
    """
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.data.prepare import load_checked

    if not dataset_dir:
        from medsim.data.sample import ensure_sample

        dataset_dir = ensure_sample() / "derm"
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise MedsimError(f"{ckpt}: checkpoint not found (train first: medsim train BUNDLE --output DIR)")
    _load_weights(network, ckpt)
    network.eval()
    src, _ = load_checked(dataset_dir, lenient=True, report_path=Path(out_file).with_suffix(".skipped.json"))
    items = [{"image": it["image"], "label": it.get("label", -1), "index": i} for i, it in enumerate(src.items)]
    loader = DataLoader(make_dataset(items, transform), batch_size=batch_size, num_workers=0)
    embs, atts, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"].to(device)
            out = inferer(x, network) if inferer is not None else network(x)
            embs.append(out["embedding"].cpu())
            atts.append(out["attention"].cpu())
            labels.append(torch.as_tensor(batch["label"]))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file, suffix=".npz") as tmp:
        np.savez_compressed(tmp, embedding=torch.cat(embs).numpy(), attention=torch.cat(atts).numpy(),
                            label=torch.cat(labels).numpy(), id=np.array([str(it.get("id", "")) for it in src.items]),
                            classes=np.array(src.classes))
    print(f"embedded {len(items)} images -> {out_file}")
    return out_file
