"""Combining models: soft voting of probabilities (never logits), hard and soft votes of
submission CSVs joined by ImageID (ensemble_csv.py), a mask + gender + age trio of per-category
models into 18 classes, and per-class calibration offsets that tune macro F1 on out-of-fold
predictions. numpy and pandas only: ensemble_csv.py starts without torch."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from maskface import labels
from maskface.cli import UserError
from maskface.files import read_csv_checked, read_json_checked
from maskface.labels import NUM_CLASSES, PROB_COLUMNS, check_labels, check_probabilities

HEAD_CATEGORIES = ("mask", "gender", "age")
CALIBRATION_GRID = np.linspace(-2.0, 2.0, 17)  # coarse on purpose: a fine grid overfits the OOF

VOTING_RULE = """\
soft voting:
  Every run counts once, however many checkpoints it has: a model's probabilities are
  averaged over its views (--tta), a k-fold run's over its folds, then:
  - 18-class runs (plain or multi-head) each give one 18-class estimate, weight 1 (or its
    --weights number);
  - per-category runs (--category mask/gender/age; 6 age bins folded to 3) are averaged
    per category by their weights, and a complete mask+gender+age trio gives ONE 18-class
    estimate p(mask) * p(gender) * p(age), weighted by the mean weight of its runs;
  - the answer's probabilities are the weighted mean of the 18-class estimates.
  Probabilities are averaged, never logits. Per-category runs without a complete trio need
  an 18-class run (they are then ignored, with a warning); otherwise it is an error.
  ans = argmax(log p + calibration offsets) when calibrated; the _probs.csv keeps the raw p."""


def ensemble_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Soft vote: the mean of probability arrays of one shape (never logits: rows must sum to 1)."""
    if not probabilities:
        raise ValueError("no probabilities to average")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    if (stacked < 0).any() or not np.allclose(stacked.sum(-1), 1.0, atol=1e-3):
        raise ValueError("expected probabilities (non-negative, rows summing to 1), not logits")
    return stacked.mean(0)


def weighted_probabilities(probabilities: Sequence[np.ndarray],
                           weights: Sequence[float]) -> np.ndarray:
    """Weighted soft vote: sum_i w_i p_i / sum_i w_i of probability arrays of one shape. The
    weights are scaled by their largest first, so huge ones (1e308 each) cannot overflow their sum
    into inf and every vote into 0; a sum that is still not finite is refused."""
    weights = np.asarray(weights, dtype=np.float64)
    if (weights.shape != (len(probabilities),) or not np.isfinite(weights).all()
            or (weights < 0).any() or not weights.max(initial=0.0) > 0):
        raise ValueError(f"weights {weights.tolist()}: expected one finite number >= 0 per "
                         "array, summing to more than 0")
    scaled = weights / weights.max()  # each in 0..1: their sum is at most the number of arrays
    total = scaled.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"weights {weights.tolist()}: their sum is not a finite positive number")
    ensemble_probabilities(probabilities)  # the same checks: probabilities, never logits
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    return np.tensordot(scaled / total, stacked, axes=1)


def check_categories(categories: Sequence[str]) -> list[str]:
    """Missing head categories of an incomplete trio; an error when nothing makes 18 classes."""
    heads = {c for c in categories if c in HEAD_CATEGORIES}
    missing = [c for c in HEAD_CATEGORIES if c not in heads]
    if heads and missing and "multi" not in categories:
        raise UserError(f"models for {', '.join(sorted(heads))} but none for {', '.join(missing)}: "
                        "add a model of each missing category, or an 18-class model")
    if not categories:
        raise UserError("no models given")
    return missing if heads else []


def combine_categories(probs_by_category: dict[str, list[np.ndarray]],
                       say: Callable[[str], None] = print) -> np.ndarray:
    """18-class probabilities from 18-class models and/or a mask+gender+age trio (see --help)."""
    present = [c for c, probs in probs_by_category.items() if len(probs)]
    missing = check_categories(present)
    estimates = list(probs_by_category.get("multi", []))
    if missing:
        say(f"warning: no {', '.join(missing)} model; the per-category models are ignored")
    elif any(c in present for c in HEAD_CATEGORIES):
        heads = [ensemble_probabilities(probs_by_category[c]) for c in HEAD_CATEGORIES]
        estimates.append(labels.heads_to_class_probs(*heads))
    return ensemble_probabilities(estimates)


def check_run_weights(weights: Sequence[float] | None, n_runs: int, flag: str = "--weights"
                      ) -> np.ndarray:
    """One finite weight > 0 per run (all 1 when not given); UserError naming the flag."""
    if weights is None:
        return np.ones(n_runs)
    if len(weights) != n_runs:
        raise UserError(f"{flag}: {len(weights)} weight(s) for {n_runs} run(s); expected one per "
                        "run, in the order the runs are given")
    if not all(np.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"{flag}: " + " ".join(f"{w:g}" for w in weights)
                        + "; expected positive finite numbers")
    return np.asarray(weights, dtype=np.float64)


def _run_groups(categories: Sequence[str]) -> tuple[list[int], dict[str, list[int]]]:
    """(the positions of the 18-class runs, {head category: the positions of its runs})."""
    return ([i for i, c in enumerate(categories) if c == "multi"],
            {c: [i for i, cat in enumerate(categories) if cat == c] for c in HEAD_CATEGORIES})


def run_vote_shares(categories: Sequence[str], n_models: Sequence[int],
                    weights: np.ndarray) -> list[tuple[str, float]]:
    """What each checkpoint weighs in combine_runs, per run: (what the share is of, the share of
    one of its checkpoints). An 18-class run's checkpoint: its share of the answer's vote; a
    per-category run's: its share of its head's average (the trio itself weighs
    ``trio_share``)."""
    multi, heads = _run_groups(categories)
    trio = all(heads.values())
    trio_weight = float(np.mean([weights[i] for c in HEAD_CATEGORIES for i in heads[c]])) \
        if trio else 0.0
    total = sum(weights[i] for i in multi) + trio_weight
    shares = []
    for i, category in enumerate(categories):
        if category == "multi":
            shares.append(("the vote", weights[i] / total / n_models[i]))
        elif trio:
            head_total = sum(weights[j] for j in heads[category])
            shares.append((f"the {category} head (the trio weighs {trio_weight / total:.4f})",
                           weights[i] / head_total / n_models[i]))
        else:
            shares.append(("nothing (no complete trio)", 0.0))
    return shares


def combine_runs(runs: Sequence[tuple[str, Sequence[np.ndarray]]],
                 weights: Sequence[float] | None = None,
                 say: Callable[[str], None] = print) -> np.ndarray:
    """The soft vote of runs, each (category, its checkpoints' probabilities): a run's
    checkpoints (a k-fold run's folds) are averaged first, so a 5-fold run weighs as much as a
    single one; then 18-class runs and a mask+gender+age trio vote with ``weights`` (one per run,
    all 1 by default; see VOTING_RULE)."""
    weight = check_run_weights(weights, len(runs))
    per_run = [ensemble_probabilities(list(probs)) for _, probs in runs]
    categories = [category for category, _ in runs]
    check_categories(categories)
    multi, heads = _run_groups(categories)
    estimates = [per_run[i] for i in multi]
    estimate_weights = [weight[i] for i in multi]
    if any(heads.values()):
        if not all(heads.values()):
            missing = [c for c in HEAD_CATEGORIES if not heads[c]]
            say(f"warning: no {', '.join(missing)} model; the per-category models are ignored")
        else:
            head_probs = [weighted_probabilities([per_run[i] for i in heads[c]],
                                                 [weight[i] for i in heads[c]])
                          for c in HEAD_CATEGORIES]
            estimates.append(labels.heads_to_class_probs(*head_probs))
            estimate_weights.append(float(np.mean([weight[i] for c in HEAD_CATEGORIES
                                                   for i in heads[c]])))
    return weighted_probabilities(estimates, estimate_weights)


# ----------------------------------------------------------------------------------------------
# Calibration: per-class offsets on log-probabilities
# ----------------------------------------------------------------------------------------------
def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_classes: int = NUM_CLASSES) -> float:
    """sklearn's macro F1 (over the labels present in either array) from one bincount: the
    calibration search scores hundreds of candidates, where sklearn's checks dominate."""
    counts = np.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes)
    counts = counts.reshape(n_classes, n_classes)
    both = counts.sum(0) + counts.sum(1)
    present = both > 0
    return float(np.mean(2 * np.diag(counts)[present] / both[present]))


def fit_calibration(oof_probs: np.ndarray, labels: np.ndarray, iterations: int = 3,
                    grid: np.ndarray = CALIBRATION_GRID) -> np.ndarray:
    """Per-class log-prob offsets maximising macro F1, by coordinate ascent over ``grid``.
    A change is kept only when it raises F1, so F1 never falls and offsets stay at 0 otherwise."""
    log_probs = np.log(np.clip(oof_probs, 1e-12, None))
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = oof_probs.shape[1]
    offsets = np.zeros(n_classes)
    best = macro_f1(labels, log_probs.argmax(1), n_classes)
    for _ in range(iterations):
        improved = False
        for c in range(n_classes):
            for value in grid:
                trial = offsets.copy()
                trial[c] = value
                f1 = macro_f1(labels, (log_probs + trial).argmax(1), n_classes)
                if f1 > best + 1e-12:
                    best, offsets, improved = f1, trial, True
        if not improved:
            break
    return offsets


def read_oof(oof_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """oof.csv of a --category multi k-fold run -> (probabilities [N, 18], labels [N]), every
    cell checked: a bad one would otherwise surface as a numpy error or a silent NaN score."""
    oof = read_csv_checked(oof_path, ["label"])
    if not set(PROB_COLUMNS) <= set(oof.columns):
        raise UserError(f"{oof_path}: calibration needs the 18 columns p0..p17 of a "
                        "--category multi run")
    if oof.empty:
        raise UserError(f"{oof_path}: no rows; expected one scored photo per row")
    labels = check_labels(oof["label"], str(oof_path), "label")
    return check_probabilities(oof, str(oof_path)), labels


def read_calibration(path: Path) -> np.ndarray:
    offsets = read_json_checked(path).get("offsets")
    if (not isinstance(offsets, list) or len(offsets) != NUM_CLASSES
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in offsets)):
        raise UserError(f"{path}: expected \"offsets\": a list of {NUM_CLASSES} finite numbers")
    return np.asarray(offsets, dtype=float)


def calibrated_predictions(probs: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """argmax of the probabilities, or of log p + per-class offsets when calibrated."""
    if offsets is None:
        return probs.argmax(1)
    return (np.log(np.clip(probs, 1e-12, None)) + offsets).argmax(1)


TIE_TOLERANCE = 1e-9  # float weights (0.1 + 0.2 vs 0.3) must still count as ties


def aligned_matrix(columns: list[pd.Series] | list[pd.DataFrame]) -> np.ndarray:
    """Stack the tables on the first one's ImageID order -> [files, rows(, classes)]."""
    index = columns[0].index
    stacked = [table.reindex(index).to_numpy() for table in columns]
    if any(len(table) != len(index) or pd.isna(values).any()
           for table, values in zip(columns, stacked)):
        raise ValueError("the tables do not hold the same ImageIDs")
    return np.stack(stacked)


def vote_weights(weights: Sequence[float] | None, n_files: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_files)
    if len(weights) != n_files:
        raise ValueError(f"{len(weights)} weight(s) for {n_files} files")
    weight = np.asarray(weights, dtype=np.float64)
    # scaled by the largest: votes of 1e308 each would add up to inf (every class tied)
    largest = weight.max(initial=0.0)
    return weight / largest if np.isfinite(largest) and largest > 0 else weight


def hard_vote(predictions: list[pd.Series], weights: Sequence[float] | None = None
              ) -> tuple[pd.Series, int]:
    """Weighted majority of class predictions (Series indexed by ImageID) -> (ans, ties broken).

    Among the classes tied for the most votes, the winner is the class of the earliest file that
    predicted one of them. The result is in the first Series' order.
    """
    votes = aligned_matrix(predictions).astype(np.int64)  # [files, rows]
    weight = vote_weights(weights, len(predictions))
    rows = np.arange(votes.shape[1])
    scores = np.zeros((votes.shape[1], NUM_CLASSES))
    for file_votes, file_weight in zip(votes, weight):  # loop over files, vectorised over rows
        scores[rows, file_votes] += file_weight
    best = scores.max(axis=1, keepdims=True)
    tied = scores >= best - TIE_TOLERANCE * max(1.0, weight.sum())
    voted_for_tied = tied[rows[None, :], votes]  # [files, rows]
    first_file = voted_for_tied.argmax(axis=0)  # earliest file whose class is among the best
    answer = votes[first_file, rows]
    n_ties = int((tied.sum(axis=1) > 1).sum())
    return pd.Series(answer, index=predictions[0].index, name="ans"), n_ties


def soft_vote(probabilities: list[pd.DataFrame], weights: Sequence[float] | None = None
              ) -> tuple[pd.Series, pd.DataFrame]:
    """Weighted mean of p0..p17 tables (indexed by ImageID) -> (argmax ans, mean probabilities)."""
    stacked = aligned_matrix([table[PROB_COLUMNS] for table in probabilities])
    mean = weighted_probabilities(list(stacked), vote_weights(weights, len(probabilities)))
    index = probabilities[0].index
    return (pd.Series(mean.argmax(axis=1), index=index, name="ans"),
            pd.DataFrame(mean, index=index, columns=PROB_COLUMNS))
