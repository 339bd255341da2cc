"""Multi-label AP and F1 against plain-Python references, on inputs full of ties; AP must not change,
bit for bit, when the rows come in another order (each rank's share is gathered in any order)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.tasks.ranking import average_precision, f1_at


def reference_ap(scores: list[float], targets: list[int]) -> float:
    """The definition, threshold by threshold: sum of (R_n - R_{n-1}) * P_n over distinct scores."""
    positives = sum(targets)
    if positives == 0:
        return math.nan
    total, recall_before = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        kept = [t for s, t in zip(scores, targets) if s >= threshold]
        recall = sum(kept) / positives
        total += (recall - recall_before) * sum(kept) / len(kept)
        recall_before = recall
    return total


def tied_inputs(seed: int, rows: int = 40, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores from a handful of values (many ties), sparse targets; class 0 has no positive."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (rows, classes), generator=generator).float() / 5
    targets = (torch.rand(rows, classes, generator=generator) < 0.3).long()
    targets[:, 0] = 0
    return scores, targets


def columns(tensor: torch.Tensor) -> list[list[float]]:
    return tensor.t().tolist()


def test_hand_checked_cases() -> None:
    # scikit-learn's documented example: 0.8333...
    ap = average_precision(torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([[0], [0], [1], [1]]))
    assert ap.dtype == torch.float64 and ap.tolist() == pytest.approx([5 / 6])
    # Three tied at 0.5 hold one of two positives: 1/2 * 1/3 at 0.5, then 1/2 * 2/4 at 0.1.
    tied = average_precision(torch.tensor([[0.5], [0.5], [0.5], [0.1]]), torch.tensor([[1], [0], [0], [1]]))
    assert tied.tolist() == pytest.approx([5 / 12])
    # Every positive ranked first: 1; all rows tied: the fraction of positives.
    scores = torch.tensor([[0.9, 0.3], [0.8, 0.3], [0.2, 0.3], [0.1, 0.3]])
    targets = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0]])
    assert average_precision(scores, targets).tolist() == pytest.approx([1.0, 0.25])


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_definition_on_random_ties(seed: int) -> None:
    scores, targets = tied_inputs(seed)
    expected = [reference_ap(s, t) for s, t in zip(columns(scores), columns(targets))]
    got = average_precision(scores, targets).tolist()
    assert math.isnan(got[0]) and math.isnan(expected[0])
    assert got[1:] == pytest.approx(expected[1:], rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_row_order_changes_nothing_not_even_the_last_bit(seed: int) -> None:
    scores, targets = tied_inputs(seed, rows=200)
    shuffled = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(average_precision(scores[shuffled], targets[shuffled]),
                               average_precision(scores, targets), rtol=0, atol=0, equal_nan=True)
    assert f1_at(scores[shuffled], targets[shuffled], 0.5) == f1_at(scores, targets, 0.5)


def test_no_positive_is_nan_and_no_row_at_all_too() -> None:
    ap = average_precision(torch.tensor([[0.9, 0.2], [0.1, 0.8]]), torch.tensor([[0, 1], [0, 0]]))
    assert math.isnan(ap[0]) and ap[1].item() == 0.5
    assert average_precision(torch.zeros(0, 3), torch.zeros(0, 3)).isnan().all()


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="must both be"):
        average_precision(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="must both be"):
        f1_at(torch.zeros(4), torch.zeros(4), 0.5)


def reference_f1(scores: list[list[float]], targets: list[list[int]], threshold: float) -> dict[str, float]:
    """Counts cell by cell; 0 where a ratio is undefined, macro over classes seen at all."""
    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    counts = []  # (tp, fp, fn) per class
    for c in range(len(scores[0])):
        pairs = [(row[c] >= threshold, bool(target[c])) for row, target in zip(scores, targets)]
        counts.append((sum(p and t for p, t in pairs), sum(p and not t for p, t in pairs),
                       sum(t and not p for p, t in pairs)))
    tp, fp, fn = (sum(column) for column in zip(*counts))
    seen = [ratio(2 * a, 2 * a + b + c) for a, b, c in counts if a + b + c]
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "f1_macro": sum(seen) / len(seen) if seen else 0.0}


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.5, 1.0])
def test_f1_matches_counting_by_hand(seed: int, threshold: float) -> None:
    scores, targets = tied_inputs(seed)
    got = f1_at(scores, targets, threshold)
    assert got == pytest.approx(reference_f1(scores.tolist(), targets.tolist(), threshold), rel=1e-12)


def test_f1_hand_checked() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.7, 0.5], [0.4, 0.3, 0.1]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    # Predicted at 0.5: (0,0) hit, (0,2) false, (1,1) hit, (1,2) false; (1,0) missed. Class 2 has no
    # positive but two false predictions: F1 0, and it counts in the macro average.
    assert f1_at(scores, targets, 0.5) == pytest.approx(
        {"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "f1_macro": (2 / 3 + 1 + 0) / 3})
    # Nothing predicted: precision 0, not NaN; a class neither present nor predicted is left out.
    nothing = f1_at(scores, targets, 0.95)
    assert nothing == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_macro": 0.0}
    only_present = f1_at(torch.tensor([[0.9, 0.1]]), torch.tensor([[1, 0]]), 0.5)
    assert only_present["f1_macro"] == 1.0
