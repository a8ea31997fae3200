"""Out-of-fold ensemble selection: which k-fold runs to average, with which weights.

Runs that share one folds.csv scored every training photo with a model that never saw its
person (oof.csv), so their OOF predictions can be compared and mixed. Greedy forward selection
with replacement (Caruana et al., 2004, "Ensemble selection from libraries of models") adds, step
by step, the run whose addition gives the best OOF macro F1 of the mean probability; a run picked
twice weighs twice. A split-half check (select on half the people, score on the other half) shows
whether the gain over the best single run survives on people the selection never saw. The result
is a small JSON file (files.read_selection_json) that inference.py --ensemble and
ensemble_csv.py --soft --weights_file apply.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from maskface import run_folder
from maskface.cli import UserError
from maskface.ensemble import (
    HEAD_CATEGORIES,
    calibrated_predictions,
    fit_calibration,
    macro_f1,
    weighted_probabilities,
)
from maskface.files import file_sha256, read_csv_checked, read_json_checked
from maskface.labels import (
    CATEGORY_CLASSES,
    NUM_CLASSES,
    category_target,
    check_probabilities,
    decode_class,
    encode_class,
    heads_to_class_probs,
)

STEPS = 20         # greedy steps at most (a run may be added again: with replacement)
PATIENCE = 5       # stop after this many steps without a better OOF F1
SPLIT_REPEATS = 5  # split-half check: random halvings of the people, each scored both ways
MAX_TRIOS = 64     # each trio is a candidate [N, 18] in memory: more asks for a --filter


# ----------------------------------------------------------------------------------------------
# Reading k-fold runs: out-of-fold predictions aligned photo by photo
# ----------------------------------------------------------------------------------------------


def folds_fingerprint(folds_csv: Path) -> str:
    """sha256 of a folds.csv's profile -> fold assignment (sorted), not of its bytes: the same
    folds written in another row order are the same folds."""
    table = read_csv_checked(folds_csv, ["profile", "fold"])
    lines = sorted(f"{p},{int(f)}" for p, f in zip(table["profile"].astype(str), table["fold"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class OofRun:
    """One finished k-fold run's out-of-fold predictions, rows in the order of ``keys``."""
    run_dir: Path
    name: str
    category: str
    folds_sha256: str
    oof_sha256: str
    keys: np.ndarray      # profile/photo file name: the same photo in every run
    profiles: np.ndarray
    folds: np.ndarray
    labels: np.ndarray    # in the run's category (18 classes, or mask / gender / age)
    probs: np.ndarray     # [N, classes of the category]
    oof_f1: float = field(default=float("nan"))


def read_oof_run(run_dir: Path, name: str) -> OofRun:
    """A k-fold run folder -> its OOF predictions, every file checked (one line on a problem)."""
    config_path, oof_path, folds_path = (run_dir / run_folder.CONFIG, run_dir / run_folder.OOF,
                                         run_dir / run_folder.FOLDS)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not oof_path.is_file():
        raise UserError(f"{run_dir}: no oof.csv; selection needs finished k-fold runs (train.py "
                        "--kfold K, or --folds FILE; an unfinished one: --resume it)")
    if not folds_path.is_file():
        raise UserError(f"{run_dir}: has oof.csv but no folds.csv; expected a k-fold run folder")
    category = read_json_checked(config_path).get("category", "multi")
    if category not in CATEGORY_CLASSES:
        raise UserError(f"{config_path}: category {category!r}; expected one of "
                        f"{', '.join(CATEGORY_CLASSES)}")
    n_classes = CATEGORY_CLASSES[category]
    columns = [f"p{c}" for c in range(n_classes)]
    table = read_csv_checked(oof_path, ["path", "profile", "fold", "label", *columns])
    if table.empty:
        raise UserError(f"{oof_path}: no rows; expected one scored photo per row")
    truth = pd.to_numeric(table["label"], errors="coerce")
    bad = ~truth.isin(range(n_classes))
    if bad.any():
        raise UserError(f"{oof_path}: {int(bad.sum())} label(s) not an integer 0..{n_classes - 1} "
                        f"of a {category} run (first: line {int(bad.to_numpy().argmax()) + 2})")
    probs = check_probabilities(table, str(oof_path), columns=columns)
    keys = (table["profile"].astype(str) + "/" + table["path"].astype(str).map(
        lambda p: Path(p).name)).to_numpy()
    if len(set(keys)) != len(keys):
        raise UserError(f"{oof_path}: a photo is listed twice; expected each photo once")
    order = np.argsort(keys, kind="stable")
    return OofRun(run_dir=run_dir, name=name, category=category,
                  folds_sha256=folds_fingerprint(folds_path), oof_sha256=file_sha256(oof_path),
                  keys=keys[order], profiles=table["profile"].astype(str).to_numpy()[order],
                  folds=table["fold"].to_numpy()[order], labels=truth.to_numpy(int)[order],
                  probs=probs[order])


def check_same_folds(runs: Sequence[OofRun]) -> None:
    """All runs on one folds.csv and the same photos, else one line naming the groups."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        groups.setdefault(run.folds_sha256, []).append(run.name)
    if len(groups) > 1:
        shown = "; ".join(f"{', '.join(names)} (folds {sha[:8]})" for sha, names in groups.items())
        raise UserError(f"runs on different folds cannot be compared by their out-of-fold "
                        f"scores: {shown}; train them with --folds <one run>/folds.csv")
    first = runs[0]
    for run in runs[1:]:
        if len(run.keys) != len(first.keys) or (run.keys != first.keys).any():
            raise UserError(f"{run.name} and {first.name} scored different photos in oof.csv "
                            "(trained on different data?); select runs of one data set")
        if (run.folds != first.folds).any():
            raise UserError(f"{run.name} and {first.name}: oof.csv folds differ from folds.csv")


def truth_labels(runs: Sequence[OofRun]) -> np.ndarray:
    """The 18-class truth every run must agree on: an 18-class run's labels, else the trio's
    mask, gender and age labels combined. Runs trained on other labels (--relabel) are refused."""
    multi = [r for r in runs if r.category == "multi"]
    if multi:
        truth = multi[0].labels
    else:
        first = {c: next(r for r in runs if r.category == c) for c in HEAD_CATEGORIES}
        truth = encode_class(first["mask"].labels, first["gender"].labels,
                                     first["age"].labels)
    reference = multi[0].name if multi else "the trio"
    for run in runs:
        if (category_target(truth, run.category) != run.labels).any():
            raise UserError(f"{run.name}: oof.csv labels differ from {reference}'s (another "
                            "--relabel file?); their OOF scores are not comparable")
    return truth


# ----------------------------------------------------------------------------------------------
# Candidates: what one step of the selection may add
# ----------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """An 18-class run, or a mask + gender + age trio of per-category runs (p = product)."""
    runs: tuple[str, ...]
    probs: np.ndarray  # [N, 18]

    @property
    def label(self) -> str:
        return "+".join(self.runs)


def build_candidates(runs: Sequence[OofRun]) -> list[Candidate]:
    """Each 18-class run, and each trio of one mask, one gender and one age run. Per-category
    runs that make no trio are refused: they cannot become 18 classes."""
    by_category = {c: [r for r in runs if r.category == c] for c in HEAD_CATEGORIES}
    present = [c for c in HEAD_CATEGORIES if by_category[c]]
    missing = [c for c in HEAD_CATEGORIES if not by_category[c]]
    if present and missing:
        names = ", ".join(r.name for c in present for r in by_category[c])
        raise UserError(f"per-category runs {names} make no mask+gender+age trio (no "
                        f"{', '.join(missing)} run): add one, or leave them out")
    candidates = [Candidate((r.name,), r.probs) for r in runs if r.category == "multi"]
    n_trios = int(np.prod([len(by_category[c]) for c in HEAD_CATEGORIES])) if present else 0
    if n_trios > MAX_TRIOS:
        raise UserError(f"{n_trios} mask x gender x age trios of per-category runs; at most "
                        f"{MAX_TRIOS}: select fewer per-category runs (--filter)")
    if present:
        for trio in itertools.product(*(by_category[c] for c in HEAD_CATEGORIES)):
            candidates.append(Candidate(tuple(r.name for r in trio), heads_to_class_probs(
                *(r.probs for r in trio))))
    return candidates


# ----------------------------------------------------------------------------------------------
# Greedy forward selection with replacement
# ----------------------------------------------------------------------------------------------
def _mean_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


@dataclass
class GreedyResult:
    counts: np.ndarray    # times each candidate was picked, in the best step's mix
    best_step: int        # the step whose mix is kept (1 = the best single candidate)
    history: list[dict]   # per step: added candidate index, OOF macro F1 of the mix

    @property
    def weights(self) -> np.ndarray:
        return self.counts / self.counts.sum()


def greedy_selection(probs: Sequence[np.ndarray], labels: np.ndarray, steps: int = STEPS,
                     patience: int = PATIENCE) -> GreedyResult:
    """Caruana's greedy forward selection with replacement, maximising the macro F1 of the mean
    probability of the picked candidates. Ties in F1 (a step function) go to the candidate whose
    mix gives the truth the higher mean log-probability, then to the earlier one. Runs ``steps``
    steps at most, stops after ``patience`` steps without a better F1, and keeps the best step's
    mix (the earliest on ties); step 1 is the best single candidate, so the result's OOF F1 is
    never below it."""
    labels = np.asarray(labels, dtype=np.int64)
    steps = steps if len(probs) > 1 else 1  # one candidate: every step is the same mix
    total = np.zeros_like(np.asarray(probs[0], dtype=np.float64))
    counts = np.zeros(len(probs), dtype=np.int64)
    best = GreedyResult(counts.copy(), 0, [])
    best_f1, stale = -1.0, 0
    for step in range(1, steps + 1):
        scored = []
        for index, candidate in enumerate(probs):
            mix = (total + candidate) / step
            scored.append((macro_f1(labels, mix.argmax(1)), _mean_log_likelihood(mix, labels),
                           -index))
        f1, _, minus_index = max(scored)
        index = -minus_index
        total += probs[index]
        counts[index] += 1
        best.history.append({"step": step, "added": index, "f1": f1})
        if f1 > best_f1 + 1e-12:
            best_f1, best.counts, best.best_step, stale = f1, counts.copy(), step, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def mix_of(probs: Sequence[np.ndarray], weights: np.ndarray, rows=slice(None)) -> np.ndarray:
    used = [i for i, w in enumerate(weights) if w > 0]
    return weighted_probabilities([probs[i][rows] for i in used], weights[used])


# ----------------------------------------------------------------------------------------------
# Split-half check: does the gain hold on people the selection never saw?
# ----------------------------------------------------------------------------------------------
def person_halves(labels: np.ndarray, profiles: np.ndarray, seed: int) -> list[np.ndarray]:
    """Two halves of the people (each person's photos together), stratified on gender x age."""
    from sklearn.model_selection import (
        StratifiedGroupKFold,  # slow to import: ensemble_csv.py's start
    )
    _, gender, age = decode_class(labels)
    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    return [rows for _, rows in splitter.split(labels, gender * 3 + age, groups=profiles)]


ARMS = ("mix", "single_calibrated", "mix_calibrated")  # what the split-half check scores


def split_half_check(probs: Sequence[np.ndarray], labels: np.ndarray, profiles: np.ndarray, *,
                     steps: int = STEPS, patience: int = PATIENCE, repeats: int = SPLIT_REPEATS,
                     seed: int = 0) -> dict:
    """Select (and calibrate) on one half of the people, score on the other, both ways, over
    ``repeats`` random halvings. Each arm's held-out gain is its F1 minus the F1 of the best
    single candidate chosen on the same half, both scored on the held-out half: the selected mix,
    the best single with calibration offsets fitted on the selection half, and the mix with them."""
    gains: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        halves = person_halves(labels, profiles, seed + repeat)
        for fit_rows, test_rows in (halves, halves[::-1]):
            truth = labels[test_rows]
            chosen = greedy_selection([p[fit_rows] for p in probs], labels[fit_rows], steps,
                                      patience)
            single = probs[chosen.history[0]["added"]]
            single_f1 = macro_f1(truth, single[test_rows].argmax(1))
            mix_test = mix_of(probs, chosen.weights, test_rows)
            gains["mix"].append(macro_f1(truth, mix_test.argmax(1)) - single_f1)
            for arm, fit_probs, test_probs in (
                    ("single_calibrated", single[fit_rows], single[test_rows]),
                    ("mix_calibrated", mix_of(probs, chosen.weights, fit_rows), mix_test)):
                offsets = fit_calibration(fit_probs, labels[fit_rows])
                gains[arm].append(macro_f1(truth, calibrated_predictions(test_probs, offsets))
                                  - single_f1)
    summary = {arm: {"mean": float(np.mean(g)), "std": float(np.std(g)),
                     "positive": int(np.sum(np.asarray(g) > 0)),
                     "gains": [round(v, 6) for v in g]} for arm, g in gains.items()}
    return {"repeats": repeats, "seed": seed, "halves": 2 * repeats, **summary}


def judged(gains: Sequence[float]) -> str:
    """'holds' (positive on average and on at least 80% of the held-out halves), 'is uncertain'
    (positive on average only) or 'does not hold' (fitted noise)."""
    gains = np.asarray(gains)
    if gains.mean() > 0 and (gains > 0).mean() >= 0.8:
        return "holds"
    return "is uncertain" if gains.mean() > 0 else "does not hold"


def recommendation(check: dict, alone: bool = False) -> dict:
    """What the split-half check recommends: 'single' (the best single run instead of a mix
    whose gain does not hold) and 'no_calibrate' (calibration whose gain does not hold), with the
    judgements and the calibration's held-out gains. The calibration is judged for what is kept:
    the best single run's offsets when the single replaces the mix, else the mix's."""
    mix = judged(check["mix"]["gains"])
    single = not alone and mix != "holds"
    calibration_gains = np.asarray(check["single_calibrated"]["gains"]) if single else \
        np.subtract(check["mix_calibrated"]["gains"], check["mix"]["gains"])
    calibration = judged(calibration_gains)
    return {"mix": mix, "single": single, "calibration": calibration,
            "calibration_gains": calibration_gains,
            "no_calibrate": calibration == "does not hold"}


def verdict(check: dict, best_single: str, alone: bool = False) -> str:
    """What the split-half check says in words: whether the mix's gain over the best single run
    holds on people it was not selected on, whether the calibration's does, and what is safer."""
    advice = recommendation(check, alone)
    calibration_gains = advice["calibration_gains"]
    words = (f"the selection is the best single run {best_single} alone" if alone else
             f"the mix's gain over the best single run {advice['mix']} on held-out people "
             f"({check['mix']['positive']}/{check['halves']} halves gained)")
    whose = "the best single run's calibration" if advice["single"] else "calibration's"
    words += (f"; {whose} {advice['calibration']} ({calibration_gains.mean():+.4f}, "
              f"{int((calibration_gains > 0).sum())}/{check['halves']} halves gained)")
    safer = []
    if advice["single"]:
        safer.append(f"--steps 1 (the best single run {best_single} alone)")
    if advice["no_calibrate"]:
        safer.append("--no_calibrate")
    return "verdict: " + words + (f"; safer: {' '.join(safer)}" if safer else "")


# ----------------------------------------------------------------------------------------------
# The whole selection, and its file
# ----------------------------------------------------------------------------------------------
def select_runs(runs: Sequence[OofRun], *, steps: int = STEPS, patience: int = PATIENCE,
                repeats: int = SPLIT_REPEATS, seed: int = 0, calibrate: bool = True,
                keep_mix: bool = False, say: Callable[[str], None] = print) -> dict:
    """Check the runs combine, select greedily, calibrate the mix, run the split-half check;
    returns the selection (what write_selection stores), printing each step. What the check
    recommends (recommendation) replaces the selected mix and calibration unless ``keep_mix``;
    'selected' keeps what the greedy selection chose, 'verdict' what was done about it."""
    check_same_folds(runs)
    labels = truth_labels(runs)
    candidates = build_candidates(runs)
    probs = [c.probs for c in candidates]
    for run in runs:
        run.oof_f1 = macro_f1(run.labels, run.probs.argmax(1), CATEGORY_CLASSES[
            run.category])
    chosen = greedy_selection(probs, labels, steps, patience)
    single = chosen.history[0]
    say(f"{len(candidates)} candidate(s) on {len(labels)} photos of "
        f"{len(set(runs[0].profiles))} people; best single: {candidates[single['added']].label}"
        f" OOF macro F1 {single['f1']:.4f}")
    for entry in chosen.history:
        kept = " <- kept" if entry["step"] == chosen.best_step else ""
        say(f"step {entry['step']:2d}: + {candidates[entry['added']].label:<30} OOF macro F1 "
            f"{entry['f1']:.4f} (best single {single['f1']:.4f}, "
            f"{entry['f1'] - single['f1']:+.4f}){kept}")
    mix = mix_of(probs, chosen.weights)
    offsets = fit_calibration(mix, labels) if calibrate else None
    calibrated_f1 = macro_f1(labels, calibrated_predictions(mix, offsets))
    members = [{"runs": list(c.runs), "weight": float(w), "picked": int(n)}
               for c, w, n in zip(candidates, chosen.weights, chosen.counts) if n]
    say("selected: " + ", ".join(f"{'+'.join(m['runs'])} {m['weight']:.3f}" for m in members)
        + f" -> OOF macro F1 {chosen.history[chosen.best_step - 1]['f1']:.4f}"
        + (f", calibrated {calibrated_f1:.4f} (optimistic: fitted on the same OOF)"
           if calibrate else ""))
    check = split_half_check(probs, labels, runs[0].profiles, steps=steps, patience=patience,
                             repeats=repeats, seed=seed) if repeats else None
    if check:
        arms = ", ".join(f"{name} {check[arm]['mean']:+.4f} +- {check[arm]['std']:.4f} "
                         f"({check[arm]['positive']}/{check['halves']} positive)" for arm, name in
                         zip(ARMS, ("mix", "best single + calibration", "mix + calibration")))
        say(f"split-half check ({check['halves']} halves of the people, select on one, score on "
            f"the other): held-out F1 gain over the best single run: {arms}")
    oof_f1 = chosen.history[chosen.best_step - 1]["f1"]
    selected = {"members": members, "oof_f1": oof_f1,
                "calibrated_f1": calibrated_f1 if calibrate else None}
    followed = None
    if check:
        alone = len(members) == 1
        text = verdict(check, candidates[single["added"]].label, alone=alone)
        say(text)
        advice = recommendation(check, alone)
        applied = ([f"the best single run {candidates[single['added']].label} alone (--steps 1)"]
                   if advice["single"] else []) + (
                      ["no calibration (--no_calibrate)"]
                      if advice["no_calibrate"] and calibrate else [])
        followed = {"text": text, "applied": [] if keep_mix else applied,
                    "kept_mix": bool(keep_mix and applied)}
        if applied and keep_mix:
            say("--keep_mix: the selection file holds the selected mix"
                + (" and its calibration" if calibrate else "")
                + ", not what the verdict recommends (" + "; ".join(applied) + ")")
        elif applied:
            if advice["single"]:
                best = candidates[single["added"]]
                members = [{"runs": list(best.runs), "weight": 1.0, "picked": 1}]
                mix, oof_f1 = best.probs, single["f1"]
            if advice["no_calibrate"]:
                calibrate = False
            offsets = fit_calibration(mix, labels) if calibrate else None
            calibrated_f1 = macro_f1(labels, calibrated_predictions(mix, offsets))
            say("the selection file holds what the verdict recommends: " + "; ".join(applied)
                + f" -> OOF macro F1 {oof_f1:.4f}"
                + (f", calibrated {calibrated_f1:.4f}" if calibrate else "")
                + " (--keep_mix writes the selected mix instead)")
    return {"runs": runs, "members": members, "offsets": offsets,
            "oof_f1": oof_f1, "calibrated_f1": calibrated_f1,
            "selected": selected, "verdict": followed,
            "best_single": {"runs": list(candidates[single["added"]].runs), "oof_f1": single["f1"]},
            "steps": [{"step": e["step"], "added": candidates[e["added"]].label,
                       "oof_f1": e["f1"]} for e in chosen.history],
            "kept_step": chosen.best_step, "split_half": check}


def selection_document(result: dict, output: Path, command: str) -> dict:
    """The selection file's content: run folders relative to the file (move them together),
    members and weights, calibration offsets, and where it all came from."""
    used = {name for member in result["members"] for name in member["runs"]}
    runs = {r.name: {"path": os.path.relpath(r.run_dir.resolve(), output.parent.resolve()),
                     "category": r.category, "oof_f1": round(r.oof_f1, 6),
                     "oof_sha256": r.oof_sha256} for r in result["runs"] if r.name in used}
    document = {"format": SELECTION_FORMAT, "runs": runs, "members": result["members"]}
    if result.get("verdict"):  # what the split-half check recommended, and whether it was followed
        document["verdict"] = {**result["verdict"], "selected": result["selected"]}
    if result["offsets"] is not None:
        document["calibration"] = {"offsets": [round(float(v), 6) for v in result["offsets"]],
                                   "oof_f1_before": result["oof_f1"],
                                   "oof_f1_after": result["calibrated_f1"]}
    document["provenance"] = {
        "command": command, "folds_sha256": result["runs"][0].folds_sha256,
        "candidates": {r.name: {"category": r.category, "oof_f1": round(r.oof_f1, 6)}
                       for r in result["runs"]},
        "best_single": result["best_single"], "selected_oof_f1": result["oof_f1"],
        "steps": result["steps"], "kept_step": result["kept_step"],
        "split_half": result["split_half"],
        "paths": "run paths are relative to this file's folder"}
    return document


# ----------------------------------------------------------------------------------------------
# Applying a selection file (inference.py --ensemble FILE)
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    path: Path
    run_dirs: dict[str, Path]         # name -> folder, in the file's order
    categories: dict[str, str]
    members: list[tuple[list[str], float]]
    offsets: np.ndarray | None


def read_selection(path: str | Path) -> Selection:
    """A selection file with its run folders checked: each exists and holds the oof.csv it was
    selected on (a run retrained since would get weights chosen for another model)."""
    path = Path(path)
    document = read_selection_json(path)
    run_dirs, categories = {}, {}
    for name, run in document["runs"].items():
        run_dir = path.parent / run["path"]  # an absolute path stays itself
        if not run_dir.is_dir():
            raise UserError(f"{path}: run {name}: no folder {run_dir} (the paths are relative "
                            "to the selection file; keep it next to the runs)")
        oof = run_dir / run_folder.OOF
        expected = run.get("oof_sha256")
        if not isinstance(expected, str) or not expected:
            # without it a retrained run would get weights chosen for another model, unnoticed
            raise UserError(f"{path}: run {name}: no \"oof_sha256\" (the oof.csv it was "
                            "selected on); run experiments.py select again")
        if not oof.is_file() or file_sha256(oof) != expected:
            raise UserError(f"{path}: run {name}: {oof} is not the one selected on (retrained "
                            "since?); run experiments.py select again")
        run_dirs[name], categories[name] = run_dir, run.get("category", "multi")
    members = [(list(m["runs"]), float(m["weight"])) for m in document["members"]]
    for names, _ in members:
        if len(names) == 3 and sorted(categories[n] for n in names) != sorted(HEAD_CATEGORIES):
            raise UserError(f"{path}: member {'+'.join(names)}: a trio needs one mask, one "
                            "gender and one age run")
        if len(names) == 1 and categories[names[0]] != "multi":
            raise UserError(f"{path}: member {names[0]}: a {categories[names[0]]} run alone "
                            "makes no 18 classes")
    return Selection(path, run_dirs, categories, members, selection_offsets(document))


def selection_probabilities(selection: Selection, probs_by_run: dict[str, np.ndarray]
                            ) -> np.ndarray:
    """The weighted soft vote of a selection: each member's 18-class probabilities (a run's,
    averaged over its folds, or a trio's product of heads), weighted as selected."""
    member_probs = []
    for names, _ in selection.members:
        if len(names) == 1:
            member_probs.append(probs_by_run[names[0]])
        else:
            heads = {selection.categories[n]: probs_by_run[n] for n in names}
            member_probs.append(heads_to_class_probs(*(heads[c] for c in HEAD_CATEGORIES)))
    return weighted_probabilities(member_probs, [w for _, w in selection.members])


SELECTION_FORMAT = "maskface-selection/1"


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def read_selection_json(path: str | Path) -> dict:
    """A selection file (experiments.py select), its structure checked: "runs" (name -> its
    folder), "members" (each a run, or a mask+gender+age trio of runs, with a weight >= 0; the
    weights sum to more than 0) and optional "calibration" "offsets" (18 finite numbers)."""
    value = read_json_checked(path)
    if value.get("format") != SELECTION_FORMAT:
        raise UserError(f"{path}: not a selection file of experiments.py select (expected "
                        f"\"format\": \"{SELECTION_FORMAT}\")")
    runs, members = value.get("runs"), value.get("members")
    if not isinstance(runs, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("path"), str) for r in runs.values()):
        raise UserError(f"{path}: expected \"runs\": an object of run name -> {{\"path\": ...}}")
    if not isinstance(members, list) or not members:
        raise UserError(f"{path}: expected \"members\": a non-empty list")
    for number, member in enumerate(members, 1):
        names = member.get("runs") if isinstance(member, dict) else None
        if (not isinstance(names, list) or len(names) not in (1, 3)
                or not all(isinstance(n, str) and n in runs for n in names)):
            raise UserError(f"{path}: member {number}: expected \"runs\": 1 run (or a trio of "
                            "3) named in \"runs\"")
        if not _finite_number(member.get("weight")) or member["weight"] < 0:
            raise UserError(f"{path}: member {number}: weight {member.get('weight')!r}; "
                            "expected a number >= 0")
    # the largest weight, not the sum: 1e308 + 1e308 overflows (weighted_probabilities scales)
    largest = max(member["weight"] for member in members)
    if not largest > 0:
        raise UserError(f"{path}: the members' weights are all 0; expected a positive sum")
    offsets = (value.get("calibration") or {}).get("offsets")
    if offsets is not None and (not isinstance(offsets, list) or len(offsets) != NUM_CLASSES
                                or not all(map(_finite_number, offsets))):
        raise UserError(f"{path}: expected \"calibration\": {{\"offsets\": a list of "
                        f"{NUM_CLASSES} finite numbers}}")
    return value


def selection_offsets(selection: dict) -> np.ndarray | None:
    """The calibration offsets of a checked selection file, None when it has none."""
    offsets = (selection.get("calibration") or {}).get("offsets")
    return None if offsets is None else np.asarray(offsets, dtype=float)
