"""MedAug: positive pairs from patient metadata for contrastive pretraining on chest X-rays.

Vu et al. 2021, "MedAug: Contrastive learning leveraging patient metadata improves representations for chest X-ray
interpretation" (MLHC 2021, https://arxiv.org/abs/2102.10663). Instead of two augmentations of one image (MoCo),
a positive pair is an image and *another image of the same patient*, optionally restricted by study (here the NIH
``follow_up`` number) and view; an image with no such partner is paired with itself (as in the paper).

- :func:`read_cxr_metadata` — the CXR metadata CSV (NIH ChestX-ray14 columns) → datalist items, patient ids
  hashed (:mod:`medsim.data.phi`);
- :func:`pair_candidates` — the partners of every image under a criterion (:data:`CRITERIA` presets or a list of
  :data:`RULES`);
- :class:`MedAugPaird` — a seedable MONAI transform: item → ``"views": [view of the image, view of a partner]``;
- :func:`patient_split` — train/validation/test by whole patients.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from medsim.errors import BadItem, DataError

__all__ = ["read_cxr_metadata", "pair_candidates", "PairCandidates", "MedAugPaird", "patient_split", "RULES",
           "CRITERIA", "CXR_CLASSES", "resolve_criterion"]

logger = logging.getLogger(__name__)

#: ``binary_label`` values → label index
CXR_CLASSES = ("normal", "abnormal")
#: metadata column → datalist key (required columns); ``age`` and ``sex`` are read when present
_COLUMNS = {"image": "image", "patient_id": "patient", "follow_up": "follow_up", "view_position": "view",
            "binary_label": "label_name"}

#: pairing rules: (item, candidate partner) → whether the pair is allowed
RULES: dict[str, Callable[[Mapping, Mapping], bool]] = {
    "same_patient": lambda a, b: a["patient"] == b["patient"],
    "same_view": lambda a, b: a.get("view") == b.get("view"),
    "diff_view": lambda a, b: a.get("view") != b.get("view"),
    "same_followup": lambda a, b: a.get("follow_up") == b.get("follow_up"),  # the paper's "same study"
    "diff_followup": lambda a, b: a.get("follow_up") != b.get("follow_up"),  # the paper's "distinct studies"
}
#: named criteria (the paper's Table of criteria, with NIH's follow-up number as the study and view_position as
#: the view); ``none`` pairs each image with itself (plain MoCo)
CRITERIA: dict[str, tuple[str, ...]] = {
    "none": (),
    "same_patient": ("same_patient",),
    "same_patient_same_view": ("same_patient", "same_view"),
    "same_patient_diff_followup": ("same_patient", "diff_followup"),
    "same_patient_same_view_diff_followup": ("same_patient", "same_view", "diff_followup"),
}


def _parse_int(value: str) -> int:
    f = float(value)
    if not f.is_integer():
        raise ValueError(value)
    return int(f)


def read_cxr_metadata(csv_path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None,
                      anonymizer: Any = None) -> list[dict[str, Any]]:
    """Read a CXR metadata CSV (``image, patient_id, follow_up, view_position, binary_label`` and optionally
    ``age, sex``) into datalist items.

    Items: ``{"image": path, "patient": "p-<hash>", "follow_up": int, "view": str, "label": 0|1,
    "label_name": "normal"|"abnormal", "age": int|None, "sex": str|None, "index": i}``. The patient id is hashed
    with ``anonymizer`` (default: the project's, :func:`medsim.data.phi.project_anonymizer`) and never kept in
    clear. Images are looked up in ``image_dir`` (default: ``images/`` beside the CSV).

    Raises:
        DataError: the file is missing or unreadable, a required column is missing, or rows are malformed (one
            line per problem: file, row number, column and reason; patient ids are not echoed).
    """
    from medsim.data.phi import project_anonymizer
    from medsim.data.sources import read_csv_rows

    path = Path(csv_path)
    anon = anonymizer if anonymizer is not None else project_anonymizer()
    header, rows = read_csv_rows(path)
    lower = {h.lower(): h for h in header}
    for col in _COLUMNS:
        if col not in lower:
            raise DataError(path, f"missing column '{col}'; columns are: {', '.join(header)}", field=col)
    col = {c: lower[c] for c in (*_COLUMNS, "age", "sex") if c in lower}
    folder = Path(image_dir) if image_dir is not None else path.parent / "images"
    bad: list[BadItem] = []
    items: list[dict[str, Any]] = []
    for row_no, r in enumerate(rows, start=2):  # row 1 is the header
        def fail(column: str, reason: str) -> None:
            bad.append(BadItem(str(path), reason, row=row_no, field=col[column]))

        n_bad = len(bad)
        name = r.get(col["image"], "")
        image = folder / name
        if not name:
            fail("image", "empty image name")
        elif not image.is_file():
            fail("image", f"image '{name}' not found in {folder}")
        patient = anon(r.get(col["patient_id"], ""), "p")
        if patient is None:
            fail("patient_id", "empty patient id")
        try:
            follow_up = _parse_int(r.get(col["follow_up"], ""))
        except ValueError:
            fail("follow_up", f"follow-up must be an integer, got '{r.get(col['follow_up'], '')}'")
        view = r.get(col["view_position"], "")
        if not view:
            fail("view_position", "empty view position")
        label_name = r.get(col["binary_label"], "").lower()
        if label_name not in CXR_CLASSES:
            fail("binary_label", f"binary_label must be one of {', '.join(CXR_CLASSES)}, "
                                 f"got '{r.get(col['binary_label'], '')}'")
        age = None
        if r.get(col.get("age", ""), ""):
            try:
                age = _parse_int(r[col["age"]])
            except ValueError:
                fail("age", f"age must be an integer, got '{r[col['age']]}'")
        if len(bad) > n_bad:
            continue
        items.append({"image": str(image), "patient": patient, "follow_up": follow_up, "view": view,
                      "label": CXR_CLASSES.index(label_name), "label_name": label_name, "age": age,
                      "sex": r.get(col.get("sex", ""), "") or None, "index": len(items)})
    if bad:
        raise DataError(items=bad, header=f"{len(bad)} problem(s) in {path}; fix these rows:")
    if not items:
        raise DataError(path, "no rows (only a header)")
    return items


def resolve_criterion(criterion: str | Sequence[str]) -> tuple[str, ...]:
    """A criterion name (:data:`CRITERIA`) or a list of rules (:data:`RULES`) → the tuple of rules.

    Raises:
        ValueError: an unknown name (with "did you mean"), a rule list without ``same_patient`` (MedAug pairs are
            images of one patient) or with contradictory rules.
    """
    from monai.utils import look_up_option

    if isinstance(criterion, str):
        return look_up_option(criterion, CRITERIA)  # a dict: gives the rules
    rules = tuple(look_up_option(r, tuple(RULES)) for r in criterion)
    if rules and "same_patient" not in rules:
        raise ValueError(f"MedAug pairs images of one patient: add 'same_patient' to the rules, got {list(criterion)}")
    for a, b in (("same_view", "diff_view"), ("same_followup", "diff_followup")):
        if a in rules and b in rules:
            raise ValueError(f"rules '{a}' and '{b}' exclude each other, got {list(criterion)}")
    return tuple(dict.fromkeys(rules))


@dataclass
class PairCandidates:
    """The partners of each image under ``rules``: ``partners[image] = (partner images…)``; an image without a
    partner has itself (``n_fallback`` of them; 0 by design for the ``none`` criterion)."""

    rules: tuple[str, ...]
    partners: dict[str, tuple[str, ...]] = field(repr=False)
    n_fallback: int

    def stats(self) -> dict[str, Any]:
        """Counts for a report: items, items with a real partner, fallbacks, candidate pairs (ordered),
        partners per paired item (mean, max)."""
        counts = [len(p) for img, p in self.partners.items() if p != (img,)]
        return {"rules": list(self.rules), "n_items": len(self.partners), "n_paired": len(counts),
                "n_fallback": self.n_fallback, "n_pairs": sum(counts),
                "mean_partners": round(sum(counts) / len(counts), 2) if counts else 0.0,
                "max_partners": max(counts, default=0)}


def pair_candidates(items: Sequence[Mapping[str, Any]], criterion: str | Sequence[str] = "same_patient"
                    ) -> PairCandidates:
    """The allowed partners of every item under ``criterion`` (a :data:`CRITERIA` name or a list of
    :data:`RULES`); an item with none falls back to itself (the paper does this), counted in ``n_fallback``.

    Raises:
        ValueError: a bad criterion (see :func:`resolve_criterion`), an item without ``image`` or ``patient``, or
            an image listed twice.
    """
    rules = resolve_criterion(criterion)
    by_patient: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for i, it in enumerate(items):
        if "image" not in it or it.get("patient") is None:
            raise ValueError(f"item {i} has no 'image' or no 'patient' (keys {sorted(it)}); read the metadata with "
                             "read_cxr_metadata")
        by_patient[it["patient"]].append(it)
    partners: dict[str, tuple[str, ...]] = {}
    n_fallback = 0
    checks = [RULES[r] for r in rules]
    for it in items:
        if it["image"] in partners:
            raise ValueError(f"image listed twice: {it['image']}")
        found = tuple(o["image"] for o in by_patient[it["patient"]] if o["image"] != it["image"]
                      and all(ok(it, o) for ok in checks)) if rules else ()
        if not found:
            found, n_fallback = (it["image"],), n_fallback + (1 if rules else 0)
        partners[it["image"]] = found
    if n_fallback:
        logger.info("MedAug %s: %d of %d image(s) have no partner and are paired with themselves", "+".join(rules),
                    n_fallback, len(partners))
    return PairCandidates(rules, partners, n_fallback)


def _randomizable():
    from monai.transforms import Randomizable, Transform

    return Randomizable, Transform


class MedAugPaird(*_randomizable()):  # type: ignore[misc]
    """Item ``{"image": path, …}`` → ``{…, "views": [view of the image, view of a partner]}``.

    The partner is drawn uniformly from ``candidates.partners[image]`` (the image itself when it has none, or for
    the ``none`` criterion: then this is plain two-view MoCo). Each view goes through ``view_transform`` — a
    one-view chain, by default :func:`~medsim.data.views.xray_view_transforms` with ``n_views=1`` — which loads
    the file, so this transform comes first in a pipeline (nothing before it is worth caching).

    ``set_random_state(seed=…)`` (as ``TrainingHooks`` calls each epoch, directly or through an enclosing
    ``Compose``) fixes both the partner draws and the view augmentation.
    """

    def __init__(self, candidates: PairCandidates, view_transform: Callable | None = None, *, seed: int = 0,
                 image_key: str = "image", views_key: str = "views", **view_kwargs: Any):
        from medsim.data.views import xray_view_transforms

        self.candidates = candidates
        self.view_transform = view_transform if view_transform is not None else xray_view_transforms(
            n_views=1, **view_kwargs)
        self.image_key = image_key
        self.views_key = views_key
        self._partner: str | None = None
        self.set_random_state(seed=seed)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> "MedAugPaird":
        from monai.utils import MAX_SEED

        super().set_random_state(seed=seed, state=state)
        if hasattr(self.view_transform, "set_random_state"):
            self.view_transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: str) -> None:
        options = self.candidates.partners.get(data)
        if options is None:
            raise KeyError(f"image {data} is not among the {len(self.candidates.partners)} images the pair "
                           "candidates were built from; build them from this datalist (pair_candidates(items, …))")
        self._partner = options[int(self.R.randint(len(options)))]

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image = d.pop(self.image_key)
        self.randomize(image)
        views = []
        for path in (image, self._partner):
            out = self.view_transform({self.image_key: path})
            views.append(out[self.views_key][0])
        d[self.views_key] = views
        return d


def patient_split(items: Sequence[dict], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
                  ) -> dict[str, list[dict]]:
    """``{"training", "validation", "test"}`` with every patient in exactly one split, stratified by ``label``
    as far as patients allow (:func:`medsim.data.splits.split_items` with ``by="patient"``)."""
    from medsim.data.splits import split_items

    return split_items(items, by="patient", fractions=fractions, seed=seed)
