"""maskface.selection: out-of-fold ensemble selection never below the best single run, the
split-half check, person halves, per-category trios as one candidate; the selection file read
(oof_sha256 required, huge weights)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from maskface import labels as classes, selection
from maskface.cli import UserError


def people(n_people: int, n_folds: int = 3, seed: int = 0) -> pd.DataFrame:
    """7 photos per person with the competition's labels; folds by person."""
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(n_people):
        gender, age = rng.integers(2), rng.integers(3)
        profile = f"{person:06d}_{['male', 'female'][gender]}_Asian_{[20, 40, 60][age]}"
        for stem in classes.PHOTO_STEMS:
            label = classes.encode_class(classes.MASK_BY_STEM[stem], gender, age)
            rows.append({"path": f"/data/{profile}/{stem}.jpg", "profile": profile,
                         "fold": person % n_folds, "label": int(label)})
    # in the order selection keeps rows in (profile/photo), so arrays here line up with its own
    return pd.DataFrame(rows).sort_values("path", ignore_index=True)


def noisy_probs(labels: np.ndarray, skill: float, n_classes: int, seed: int) -> np.ndarray:
    """Probabilities that favour the true class by ``skill`` (0 = noise)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), n_classes))
    logits[np.arange(len(labels)), labels] += skill
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def write_oof_run(run_dir: Path, photos: pd.DataFrame, probs: np.ndarray,
                  category: str = "multi", folds: pd.Series | None = None) -> Path:
    """The files train.py --kfold writes that selection reads: config.json, folds.csv, oof.csv."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"category": category, "kfold": 3}))
    if folds is None:
        folds = photos.groupby("profile")["fold"].first()
    folds.rename("fold").to_frame().to_csv(run_dir / "folds.csv")
    table = photos.assign(label=classes.category_target(photos["label"].to_numpy(), category))
    columns = [f"p{c}" for c in range(probs.shape[1])]
    pd.concat([table, pd.DataFrame(probs, columns=columns)], axis=1).to_csv(
        run_dir / "oof.csv", index=False)
    return run_dir


def macro(labels, probs) -> float:
    return f1_score(labels, probs.argmax(1), average="macro")


def test_split_half_check_exposes_a_gain_fitted_to_noise(tmp_path, capsys):
    photos = people(60)
    labels = photos["label"].to_numpy()
    runs = [selection.read_oof_run(write_oof_run(tmp_path / n, photos, p), n) for n, p in (
        ("noise", noisy_probs(labels, 0.0, 18, 1)), ("good", noisy_probs(labels, 2.5, 18, 2)))]
    result = selection.select_runs(runs, repeats=5)
    # the pure-noise run raises the OOF F1 a little by chance ...
    assert "noise" in [m["runs"][0] for m in result["selected"]["members"]]
    assert result["selected"]["oof_f1"] > result["best_single"]["oof_f1"]
    # ... which the held-out halves do not confirm, and the verdict says so
    check = result["split_half"]
    assert check["mix"]["mean"] < 0.01 and check["mix"]["positive"] < 0.8 * check["halves"]
    out = capsys.readouterr().out
    assert "verdict: " in out and "gain over the best single run holds" not in out
    assert "safer: --steps 1 (the best single run good alone)" in out
    # so the selection is what the verdict recommends, not the mix it rejected
    assert result["members"] == [{"runs": ["good"], "weight": 1.0, "picked": 1}]
    assert result["oof_f1"] == result["best_single"]["oof_f1"]
    assert result["verdict"]["applied"] and not result["verdict"]["kept_mix"]
    assert "the selection file holds what the verdict recommends" in out
    # the single's offsets are fitted on the single's OOF, not the rejected mix's
    good = [r for r in runs if r.name == "good"][0]
    np.testing.assert_allclose(result["offsets"], selection.fit_calibration(good.probs,
                                                                            good.labels))


def test_keep_mix_writes_the_mix_the_verdict_rejected(tmp_path, capsys):
    photos = people(60)
    labels = photos["label"].to_numpy()
    runs = [selection.read_oof_run(write_oof_run(tmp_path / n, photos, p), n) for n, p in (
        ("noise", noisy_probs(labels, 0.0, 18, 1)), ("good", noisy_probs(labels, 2.5, 18, 2)))]
    result = selection.select_runs(runs, repeats=5, keep_mix=True)
    assert result["members"] == result["selected"]["members"]
    assert "noise" in [m["runs"][0] for m in result["members"]]
    assert result["verdict"] == {"text": result["verdict"]["text"], "applied": [],
                                 "kept_mix": True}
    assert "--keep_mix: the selection file holds the selected mix" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(12))
def test_selection_never_lowers_oof_f1_below_the_best_single_run(seed):
    rng = np.random.default_rng(seed)
    photos = people(int(rng.integers(8, 40)), seed=seed)
    labels = photos["label"].to_numpy()
    probs = [noisy_probs(labels, float(rng.uniform(0, 3)), 18, seed * 10 + i)
             for i in range(int(rng.integers(2, 6)))]
    chosen = selection.greedy_selection(probs, labels, steps=int(rng.integers(1, 12)),
                                        patience=int(rng.integers(1, 4)))
    best_single = max(macro(labels, p) for p in probs)
    mix = selection.mix_of(probs, chosen.weights)
    assert macro(labels, mix) >= best_single - 1e-12
    assert macro(labels, mix) == pytest.approx(chosen.history[chosen.best_step - 1]["f1"])
    assert chosen.history[0]["f1"] == pytest.approx(best_single)  # step 1: the best single
    assert chosen.counts.sum() == chosen.best_step


def test_person_halves_never_split_a_person():
    photos = people(40)
    halves = selection.person_halves(photos["label"].to_numpy(), photos["profile"].to_numpy(), 3)
    assert sorted(np.concatenate(halves).tolist()) == list(range(len(photos)))
    first, second = (set(photos["profile"].to_numpy()[h]) for h in halves)
    assert not first & second and abs(len(first) - len(second)) <= 4


def test_a_trio_of_per_category_runs_is_one_candidate(tmp_path):
    photos = people(30)
    labels = photos["label"].to_numpy()
    runs = []
    for category in ("mask", "gender", "age"):
        target = classes.category_target(labels, category)
        probs = noisy_probs(target, 2.0, classes.CATEGORY_CLASSES[category], len(runs))
        runs.append(write_oof_run(tmp_path / f"cv-{category}", photos, probs, category))
    oof_runs = [selection.read_oof_run(d, d.name) for d in runs]
    candidates = selection.build_candidates(oof_runs)
    assert [c.runs for c in candidates] == [("cv-mask", "cv-gender", "cv-age")]
    np.testing.assert_array_equal(selection.truth_labels(oof_runs), labels)
    expected = classes.heads_to_class_probs(*(r.probs for r in oof_runs))
    np.testing.assert_allclose(candidates[0].probs, expected)


def test_a_selection_file_without_oof_sha256_is_refused(tmp_path):
    run_dir = tmp_path / "cv"
    run_dir.mkdir()
    (run_dir / "oof.csv").write_text("path,profile,fold,label\n")
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": selection.SELECTION_FORMAT,
                                "runs": {"cv": {"path": "cv", "category": "multi"}},
                                "members": [{"runs": ["cv"], "weight": 1.0}]}))
    # before: without the key the retrained-run check was silently skipped
    with pytest.raises(UserError, match=r"run cv: no \"oof_sha256\""):
        selection.read_selection(path)


def test_huge_selection_weights_are_read(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": selection.SELECTION_FORMAT,
                                "runs": {"a": {"path": "a"}, "b": {"path": "b"}},
                                "members": [{"runs": ["a"], "weight": 1e308},
                                            {"runs": ["b"], "weight": 1e308}]}))
    assert len(selection.read_selection_json(path)["members"]) == 2
