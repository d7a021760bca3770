"""The fp32 recheck's numbers (medsim.runtime.ties): neighbours against brute force, boundary gaps against their
formula, and a calibrated margin that meets its target on the calibration images and is the smallest that does."""

from __future__ import annotations

import numpy as np
import pytest

from medsim.runtime.ties import (MARGIN_SLACK, RECHECK_ALL, boundary_gaps, calibrate_recheck, min_images, near_ties,
                                 pair_flip_errors, topk_neighbours)


def _unit(e):
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _crowded(n=300, d=32, seed=0, noise=2e-3):
    """Clustered unit embeddings (many near ties) and a perturbed copy, like bf16's rounding of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    ref = _unit(centres[rng.integers(0, 6, n)] + 0.15 * rng.normal(size=(n, d))).astype(np.float32)
    red = _unit(ref + noise * rng.normal(size=ref.shape)).astype(np.float32)
    return ref, red


def _brute_sets(q, g, k):
    s = _unit(q) @ _unit(g).T
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in s], -np.sort(-s, axis=1)


@pytest.mark.parametrize("exclude", [False, True])
def test_topk_neighbours_equal_brute_force(exclude):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    ids, sc = topk_neighbours(q, g, 7, exclude_diagonal=exclude)
    s = _unit(q) @ _unit(g).T
    if exclude:
        np.fill_diagonal(s, -np.inf)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sc, np.take_along_axis(s, ref, 1), atol=1e-6)
    assert not exclude or not (ids == np.arange(50)[:, None]).any()


def test_topk_neighbours_whole_gallery_and_too_small():
    g = np.eye(3, dtype=np.float32)
    ids, _ = topk_neighbours(g, g, 10, exclude_diagonal=True)  # asks more than there are: every other item
    assert ids.shape == (3, 2)
    same = np.ones((5, 4), np.float32)  # exact duplicates: every score ties, the query itself is still left out
    ids, _ = topk_neighbours(same, same, 2, exclude_diagonal=True)
    assert ids.shape == (5, 2) and not (ids == np.arange(5)[:, None]).any()
    with pytest.raises(ValueError, match="at least one gallery item"):
        topk_neighbours(g[:1], g[:1], 1, exclude_diagonal=True)


def test_boundary_gaps_formula():
    s = np.array([[0.9, 0.8, 0.75, 0.1], [0.5, 0.5, 0.4, 0.3]])
    np.testing.assert_allclose(boundary_gaps(s, 1), [0.1, 0.0])
    np.testing.assert_allclose(boundary_gaps(s, 2), [0.05, 0.1])
    assert np.isinf(boundary_gaps(s, 4)).all()  # no (k+1)-th score: the top-k is every case


def test_near_ties_rows_and_margin():
    rows = [[0.9, 0.8995, 0.1], [0.9, 0.5, 0.4], [0.9]]
    np.testing.assert_array_equal(near_ties(rows, 1, 1e-3), [True, False, False])
    np.testing.assert_array_equal(near_ties(rows, 2, 1e-3), [False, False, False])
    assert not near_ties(rows, 1, 0.0).any()


def test_calibrated_margin_meets_target_and_is_the_smallest():
    ref, red = _crowded()
    target = 0.99
    cal = calibrate_recheck(ref, red, ks=(1, 5, 10), target=target)
    assert cal["method"] == "agreement"  # 300 images: enough to see a 1 % miss rate
    n = len(ref)
    assert cal["images"] == n and cal["target"] == target
    assert cal["margin"] == max(v["margin"] for v in cal["by_k"].values()) > 0
    # the reduced queries against the fp32 gallery, leave-one-out
    s = _unit(red) @ _unit(ref).T
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    srt = np.take_along_axis(s, order, 1)
    for k, rec in cal["by_k"].items():
        k = int(k)
        sets32 = _brute_sets(ref, ref, k)[0]
        same = np.array([set(o[:k].tolist()) == r for o, r in zip(order, sets32)])
        gap = srt[:, k - 1] - srt[:, k]
        assert rec["same_set"] == pytest.approx(same.mean(), abs=1e-6)
        agree = same | (gap < cal["margin"])
        assert rec["same_set_rechecked"] == pytest.approx(agree.mean(), abs=1e-6) and agree.mean() >= target
        assert rec["recheck_share"] == pytest.approx(np.mean(gap < cal["margin"]), abs=1e-6)
        # minimal: any smaller margin for this k leaves more than the allowed misses
        if rec["margin"] > 0:
            smaller = rec["margin"] - 2 * MARGIN_SLACK
            assert np.mean(same | (gap < smaller)) < target
    assert cal["by_k"]["5"]["same_set"] < target  # the noise makes real disagreements to settle


def test_identical_embeddings_need_no_recheck_and_few_images_all():
    ref, _ = _crowded(n=120)
    cal = calibrate_recheck(ref, ref.copy())
    assert cal["margin"] < 1e-5 and all(v["same_set"] == 1.0 for v in cal["by_k"].values())  # the slack only
    few = calibrate_recheck(ref[:60], ref[:60])  # no error tail to estimate from 60 images: recheck every query
    assert few["method"] == "all" and few["margin"] == RECHECK_ALL
    assert near_ties([[1.0, -1.0]], 1, few["margin"]).all()
    assert calibrate_recheck(ref[:2], ref[:2]) is None  # no query with a (k+1)-th neighbour


def test_pair_flip_errors_formula():
    ref, red = _crowded(n=40, seed=3)
    err = pair_flip_errors(ref, red, pairs=3)
    s32 = ref @ ref.T
    np.fill_diagonal(s32, -np.inf)
    sq = _unit(red) @ ref.T
    want = []
    for i in range(len(ref)):
        nb = np.argsort(-s32[i], kind="stable")[:4]
        want += [abs((sq[i, a] - sq[i, b]) - (s32[i, a] - s32[i, b])) for a, b in zip(nb[:-1], nb[1:])]
    np.testing.assert_allclose(err, want, atol=1e-6)


def test_small_split_uses_the_conservative_pair_bound():
    ref, red = _crowded(n=150, seed=2)
    assert min_images(0.995) == 400 and min_images(0.99) == 200
    cal = calibrate_recheck(ref, red, target=0.995)
    assert cal["method"] == "pair bound" and cal["images"] == 150
    assert cal["margin"] == pytest.approx(np.quantile(pair_flip_errors(ref, red, 10), 0.995) + MARGIN_SLACK, abs=1e-6)
    assert cal["margin"] >= max(v["margin"] for v in cal["by_k"].values())  # never below what the split shows
    assert all(v["same_set_rechecked"] == 1.0 for v in cal["by_k"].values())
