"""maskface.ensemble: soft voting averages probabilities (never logits), hard votes follow the tie
rule, a mask + gender + age trio counts as one model, calibration never lowers F1 on its data,
huge vote weights normalised without overflow."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import ensemble_csv
from maskface import ensemble, labels
from maskface.cli import UserError
from maskface.ensemble import hard_vote, soft_vote, weighted_probabilities
from maskface.labels import PROB_COLUMNS


def one_hot_ish(winner: int, p_winner: float, runner_up: int, p_runner_up: float) -> np.ndarray:
    """18-class probabilities: two named classes, the rest spread evenly."""
    probs = np.full(18, (1 - p_winner - p_runner_up) / 16)
    probs[winner], probs[runner_up] = p_winner, p_runner_up
    return probs[None, :]


# ---------------------------------------------------------------------------- pure functions
def test_soft_vote_averages_probabilities_not_logits():
    confident_wrong = one_hot_ish(0, 0.999, 1, 0.0005)
    mildly_right = one_hot_ish(1, 0.8, 0, 0.15)
    members = [confident_wrong, mildly_right, mildly_right]
    averaged = ensemble.ensemble_probabilities(members)
    assert averaged.argmax(1).tolist() == [1]
    assert np.allclose(averaged, (confident_wrong + 2 * mildly_right) / 3)
    # averaging logits (log-probabilities) would follow the confident model: the test can tell
    assert np.mean([np.log(p) for p in members], 0).argmax(1).tolist() == [0]
    with pytest.raises(ValueError, match="not logits"):
        ensemble.ensemble_probabilities([np.log(confident_wrong)])


def test_trio_is_heads_product_and_counts_as_one_model():
    rng = np.random.default_rng(0)

    def softmax(n: int, size: int) -> np.ndarray:
        x = np.exp(rng.normal(size=(n, size)) * 3)
        return x / x.sum(1, keepdims=True)

    masks, genders, ages = [softmax(5, 3), softmax(5, 3)], [softmax(5, 2)], [softmax(5, 3)]
    trio = ensemble.combine_categories({"mask": masks, "gender": genders, "age": ages})
    expected = labels.heads_to_class_probs((masks[0] + masks[1]) / 2, genders[0], ages[0])
    assert np.allclose(trio, expected)
    # the argmax of the product decodes to the argmax of each (averaged) head
    mask, gender, age = labels.decode_class(trio.argmax(1))
    assert np.array_equal(mask, ((masks[0] + masks[1]) / 2).argmax(1))
    assert np.array_equal(gender, genders[0].argmax(1)) and np.array_equal(age, ages[0].argmax(1))
    # two 18-class models and a trio: three equal votes
    multi = [softmax(5, 18), softmax(5, 18)]
    mixed = ensemble.combine_categories({"multi": multi, "mask": masks, "gender": genders,
                                          "age": ages})
    assert np.allclose(mixed, (multi[0] + multi[1] + expected) / 3)


def test_incomplete_trio_without_18_class_model_names_the_missing():
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(UserError, match="none for gender, age"):
        ensemble.combine_categories({"mask": [probs]})
    multi = np.full((2, 18), 1 / 18)
    said = []
    out = ensemble.combine_categories({"multi": [multi], "mask": [probs]}, say=said.append)
    assert np.allclose(out, multi) and "ignored" in said[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_calibration_never_lowers_f1_on_its_data(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 18, 300)
    logits = rng.normal(size=(300, 18))
    logits[np.arange(300), labels] += 1.0
    logits[:, 3] += 1.5  # a biased class: offsets can undo it
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    offsets = ensemble.fit_calibration(probs, labels, iterations=2)
    before = f1_score(labels, probs.argmax(1), average="macro")
    after = f1_score(labels, ensemble.calibrated_predictions(probs, offsets), average="macro")
    assert after > before  # the bias is worth correcting, so the fit must find something
    predicted = ensemble.calibrated_predictions(probs, offsets)
    assert ensemble.macro_f1(labels, predicted) == pytest.approx(after)
    assert ensemble.macro_f1(labels[:5], predicted[:5]) == pytest.approx(
        f1_score(labels[:5], predicted[:5], average="macro"))  # labels absent on one side
    assert offsets.shape == (18,) and np.abs(offsets).max() <= 2


# ---------------------------------------------------------------------------- votes of CSV files
def series(answers, ids=None) -> pd.Series:
    ids = ids if ids is not None else [f"{i}.jpg" for i in range(len(answers))]
    return pd.Series(answers, index=pd.Index(ids, name="ImageID"))


def reference_vote(votes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The tie rule written out one row at a time, to check the vectorised one against."""
    answers = []
    for row in votes.T:
        scores: dict[int, float] = {}
        for label, weight in zip(row, weights):
            scores[label] = scores.get(label, 0) + weight
        best = max(scores.values())
        tied = {label for label, score in scores.items() if np.isclose(score, best)}
        answers.append(next(label for label in row if label in tied))
    return np.array(answers)


def test_majority_vote():
    answer, n_ties = hard_vote([series([1, 2, 3, 4]), series([1, 5, 3, 7]), series([0, 5, 3, 7])],
                               None)
    assert answer.tolist() == [1, 5, 3, 7]
    assert n_ties == 0


def test_vectorised_vote_matches_the_rule_row_by_row():
    rng = np.random.default_rng(0)
    votes = rng.integers(0, 4, size=(7, 2000))  # few classes: many ties
    for weights in (np.ones(7), rng.integers(1, 4, size=7).astype(float)):
        answer, n_ties = hard_vote([series(v) for v in votes], weights)
        np.testing.assert_array_equal(answer.to_numpy(), reference_vote(votes, weights))
        assert n_ties > 0


@pytest.mark.parametrize("votes, weights, expected", [
    ([[7], [3], [5]], None, 7),             # 1-1-1: the first file's class
    ([[3], [7], [5]], None, 3),
    ([[7], [3]], [1, 1], 7),                # two files disagreeing: the first file's
    ([[0], [1], [2], [1], [2]], None, 1),   # tie 1 vs 2, file 1 has neither: the second file's
    ([[0], [2], [1], [1], [2]], None, 2),
    ([[4], [6], [6]], [2, 1, 1], 4),        # weighted tie
    ([[4], [6], [6]], [0.3, 0.1, 0.2], 4),  # 0.1 + 0.2 > 0.3 in floats: still a tie
])
def test_tie_rule(votes, weights, expected):
    answer, n_ties = hard_vote([series(v) for v in votes], weights)
    assert answer.tolist() == [expected]
    assert n_ties == 1


def test_soft_vote_function_weights():
    table = lambda rows: pd.DataFrame(rows, columns=PROB_COLUMNS, index=["x.jpg"])  # noqa: E731
    answer, mean = soft_vote([table(one_hot_ish(1, 0.90, 2, 0.05)),
                              table(one_hot_ish(2, 0.90, 1, 0.05))], [1, 3])
    assert answer.tolist() == [2]
    np.testing.assert_allclose(mean.to_numpy().sum(axis=1), 1)


def test_huge_weights_are_normalised_without_overflow(tmp_path):
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(18), size=5) for _ in range(3)]
    voted = weighted_probabilities(probs, [1e308, 1e308, 1e308])
    np.testing.assert_allclose(voted, np.mean(probs, axis=0))
    for bad in ([np.inf, 1, 1], [np.nan, 1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="weights"):
            weighted_probabilities(probs, bad)
    paths = []
    for k, p in enumerate(probs):
        table = pd.DataFrame(p, columns=[f"p{c}" for c in range(18)])
        table.insert(0, "ImageID", [f"{i}.jpg" for i in range(5)])
        paths.append(tmp_path / f"m{k}_probs.csv")
        table.to_csv(paths[-1], index=False)
    for vote in (["--soft"], []):
        if not vote:  # hard vote: the submissions of the same models
            paths = [_as_submission(p) for p in paths]
        out = tmp_path / f"vote{len(vote)}.csv"
        voted_table = ensemble_csv.main(ensemble_csv.parse_args(
            [*map(str, paths), *vote, "--weights", "1e308", "1e308", "1e308", "-o", str(out)]))
        expected = np.mean(probs, axis=0).argmax(1) if vote else \
            pd.read_csv(paths[0])["ans"].to_numpy()
        if vote:
            assert (voted_table["ans"].to_numpy() == expected).all()
        else:  # equal weights: the same answers as an unweighted vote
            plain = ensemble_csv.main(ensemble_csv.parse_args(
                [*map(str, paths), "-o", str(tmp_path / "plain.csv")]))
            assert (voted_table["ans"].to_numpy() == plain["ans"].to_numpy()).all()


def _as_submission(probs_csv: Path) -> Path:
    table = pd.read_csv(probs_csv)
    out = probs_csv.with_name(probs_csv.name.replace("_probs", ""))
    pd.DataFrame({"ImageID": table["ImageID"],
                  "ans": table.filter(like="p").to_numpy().argmax(1)}).to_csv(out, index=False)
    return out


# ---------------------------------------------------------------------------- runs, not checkpoints
def random_probs(n_rows: int, n_classes: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).random((n_rows, n_classes)) + 0.01
    return p / p.sum(1, keepdims=True)


def test_a_k_fold_run_weighs_as_much_as_a_single_run():
    folds = [random_probs(5, 18, seed) for seed in range(3)]
    single = random_probs(5, 18, 9)
    voted = ensemble.combine_runs([("multi", folds), ("multi", [single])])
    # each run counts once: the single run's probabilities weigh 1/2, not 1/4
    np.testing.assert_allclose(voted, 0.5 * np.mean(folds, 0) + 0.5 * single)
    weighted = ensemble.combine_runs([("multi", folds), ("multi", [single])], [1, 3])
    np.testing.assert_allclose(weighted, 0.25 * np.mean(folds, 0) + 0.75 * single)
    shares = ensemble.run_vote_shares(["multi", "multi"], [3, 1], np.ones(2))
    assert [share for _, share in shares] == pytest.approx([1 / 6, 1 / 2])


def test_a_trio_votes_as_one_run_weighted_by_its_runs_mean_weight():
    heads = {c: random_probs(4, n, i) for i, (c, n) in
             enumerate((("mask", 3), ("gender", 2), ("age", 3)))}
    multi = random_probs(4, 18, 7)
    runs = [("multi", [multi])] + [(c, [p, p]) for c, p in heads.items()]
    trio = labels.heads_to_class_probs(heads["mask"], heads["gender"], heads["age"])
    np.testing.assert_allclose(ensemble.combine_runs(runs), (multi + trio) / 2)
    np.testing.assert_allclose(ensemble.combine_runs(runs, [2, 1, 2, 3]), (2 * multi + 2 * trio) / 4)


@pytest.mark.parametrize("weights, message", [
    ([1], r"--weights: 1 weight\(s\) for 2 run\(s\)"),
    ([1, 0], r"--weights: 1 0; expected positive finite numbers"),
    ([1, float("nan")], "expected positive finite numbers"),
])
def test_run_weights_are_checked_in_one_line(weights, message):
    runs = [("multi", [random_probs(2, 18, 0)]), ("multi", [random_probs(2, 18, 1)])]
    with pytest.raises(UserError, match=message):
        ensemble.combine_runs(runs, weights)
