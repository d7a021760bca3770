"""Frozen-embedding evaluation of pretrained encoders (issue 11): kNN accuracy and a linear probe, per run, against
a random-init encoder of the same architecture.

For each run folder (a ``medsim train`` run: its ``run.json`` network, its ``best.pt``, its own split), the training
and test splits are embedded with the frozen network (eval preprocessing, no augmentation) and:
- **kNN**: cosine k-nearest neighbours (k=20, faiss inner product on the L2-normalised embeddings) of each test
  image among the training images, majority vote → accuracy and balanced accuracy;
- **linear probe**: scikit-learn logistic regression on the training embeddings (standardised, C=1, class-balanced
  weights) → test accuracy, balanced accuracy and AUC (macro one-vs-rest; binary: the positive class);
- **retrieval/clustering** on the test split alone: NMI, R@1, MAP@R (medsim.metrics, as every medsim table).
``random`` is the first run's network with fresh weights (seed 0): what the pretraining has to beat.

    python benchmarks/ssl_frozen.py --runs runs/ssl/simclr runs/ssl/byol --out benchmarks/results/ssl_frozen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ham_recipe import write_results  # noqa: E402


def embed_split(network: torch.nn.Module, items: list[dict], transform: Any, batch_size: int = 128
                ) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) embeddings and (N,) labels of ``items`` through the frozen ``network``."""
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.engines.subspaces import embed_loader

    loader = DataLoader(make_dataset(items, transform, progress=False), batch_size=batch_size, num_workers=0)
    emb, labels, _ = embed_loader(network.eval(), loader, "cpu")
    return np.asarray(emb, dtype=np.float32), np.asarray(labels)


def knn_predict(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, k: int = 20) -> np.ndarray:
    """Majority label of each test row's k nearest training rows by cosine similarity (faiss, exact)."""
    import faiss

    def unit(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(unit(train))
    _, nn = index.search(unit(test), min(k, len(train)))
    votes = train_y[nn]
    classes = np.unique(train_y)
    counts = (votes[..., None] == classes).sum(1)
    return classes[counts.argmax(1)]


def frozen_metrics(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, *, k: int = 20,
                   seed: int = 0) -> dict[str, float]:
    """kNN and linear-probe scores of frozen embeddings (see the module docstring), plus test-split retrieval."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medsim.metrics.retrieval import evaluate_embeddings, usable_ks

    out: dict[str, float] = {}
    pred = knn_predict(train, train_y, test, k)
    out["knn_accuracy"] = float(accuracy_score(test_y, pred))
    out["knn_balanced_accuracy"] = float(balanced_accuracy_score(test_y, pred))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced",
                                                               random_state=seed))
    probe.fit(train, train_y)
    proba = probe.predict_proba(test)
    pred = probe.classes_[proba.argmax(1)]
    out["probe_accuracy"] = float(accuracy_score(test_y, pred))
    out["probe_balanced_accuracy"] = float(balanced_accuracy_score(test_y, pred))
    present = np.isin(probe.classes_, np.unique(test_y))
    if len(probe.classes_) == 2:
        out["probe_auc"] = float(roc_auc_score(test_y == probe.classes_[1], proba[:, 1]))
    elif present.sum() >= 2:
        p = proba[:, present] / proba[:, present].sum(1, keepdims=True)
        out["probe_auc"] = float(roc_auc_score(test_y, p, multi_class="ovr", average="macro",
                                               labels=probe.classes_[present]))
    res = evaluate_embeddings(test, test_y, ks=usable_ks(len(test)), seed=seed)
    out.update({"nmi": float(res["nmi"]), "R@1": float(res["R@1"]), "map_at_r": float(res["map_at_r"])})
    return out


def evaluate_run(run: Path, *, random_init: bool = False, k: int = 20) -> dict[str, Any]:
    from medsim.engines.runs import build_spec, load_run_record, load_weights
    from medsim.engines.workflow import datalists_from_split

    record = load_run_record(run)
    network = build_spec(record["network"], f"{run}/run.json#network")
    transform = build_spec(record["eval_preprocessing"], f"{run}/run.json#eval_preprocessing")
    if random_init:
        torch.manual_seed(0)
        network = build_spec(record["network"], f"{run}/run.json#network")
    else:
        load_weights(network, run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt")
    lists = datalists_from_split(run / "split.json")
    t0 = time.time()
    with torch.no_grad():
        tr, tr_y = embed_split(network, lists["training"], transform)
        te, te_y = embed_split(network, lists["test"], transform)
    res = frozen_metrics(tr, tr_y, te, te_y, k=k)
    res.update({"n_train": int(len(tr)), "n_test": int(len(te)), "dim": int(tr.shape[1]),
                "embed_seconds": round(time.time() - t0, 1)})
    return res


def report(doc: dict[str, Any]) -> str:
    keys = [("knn_accuracy", "kNN acc"), ("knn_balanced_accuracy", "kNN bal. acc"), ("probe_accuracy", "probe acc"),
            ("probe_balanced_accuracy", "probe bal. acc"), ("probe_auc", "probe AUC"), ("nmi", "NMI"), ("R@1", "R@1"),
            ("map_at_r", "MAP@R")]
    lines = [f"# {doc['title']}", "", f"Command: `{doc['command']}`", "", doc["protocol"], "",
             "| encoder | " + " | ".join(h for _, h in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in doc["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[key]:.2f}" if key in r else "-" for key, _ in keys) + " |")
    base = doc["results"].get("random")
    if base:
        lines += ["", "Gain over random init (percentage points):", ""]
        lines += ["| encoder | " + " | ".join(h for _, h in keys) + " |", "|---|" + "---|" * len(keys)]
        for name, r in doc["results"].items():
            if name != "random":
                lines.append(f"| {name} | " + " | ".join(
                    f"{100 * (r[key] - base[key]):+.2f}" if key in r and key in base else "-" for key, _ in keys)
                    + " |")
    return "\n".join(lines + [""] + doc.get("notes", [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="run folders; the name is the folder name")
    ap.add_argument("--out", default="benchmarks/results/ssl_frozen")
    ap.add_argument("--title", default="Frozen-embedding evaluation of SSL encoders")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    results: dict[str, Any] = {}
    if not args.no_random:
        results["random"] = evaluate_run(runs[0], random_init=True, k=args.k)
    for run in runs:
        results[run.name] = evaluate_run(run, k=args.k)
        print(run.name, json.dumps({k: round(v, 4) for k, v in results[run.name].items()}), flush=True)
    import shlex

    doc = {"title": args.title,
           "command": "python benchmarks/ssl_frozen.py " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != args.title and
               a != "--title"),
           "protocol": (f"Frozen encoders, eval preprocessing; each run's own split (train → test). kNN: k={args.k}, "
                        "cosine, majority vote. Linear probe: standardised features, logistic regression C=1, "
                        "class-balanced. NMI / R@1 / MAP@R on the test split alone. All numbers in %."),
           "results": results}
    return write_results(args.out, doc, report)


if __name__ == "__main__":
    raise SystemExit(main())
