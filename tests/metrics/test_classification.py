"""Classification metrics against hand-computed values."""

import numpy as np
import pytest

from medsim.metrics.classification import classification_metrics


def test_against_hand_computed_values():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    logits = np.eye(3)[pred] * 5.0
    m = classification_metrics(labels, logits)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # per class F1: class 0 P 3/4 R 3/4; class 1 P 1/2 R 1/2; class 2 P 1 R 1
    assert m["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"labels \(N,\) and logits \(N, C\)"):
        classification_metrics(np.zeros(3), np.zeros((4, 2)))
