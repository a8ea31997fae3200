"""A run's folder and every file in it, named here and nowhere else: its name ({name}, then
{name}2, {name}3, ...), config.json and photos.csv written together, summary.csv, per_class.csv,
the k-fold files, the notes of experiments.py note, the folder of a run that failed before its
first checkpoint removed, and the record of the photos a run trains on (path, content digest,
label, role), which a --resume compares with today's data so that it continues the same
experiment or refuses.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from maskface.cli import UserError
from maskface.files import (
    atomic_write_text,
    read_csv_checked,
    read_json_checked,
    remove_stale_temps,
    write_together,
)
from maskface.labels import check_labels

# the files of a run folder (a k-fold run: the run's own, and a fold{k}/ folder per fold)
CONFIG = "config.json"            # every resolved flag (a replay's defaults)
PHOTOS = "photos.csv"             # every photo trained on: path, profile, label, digest, role
BEST = "best.pth"                 # the best epoch's weights, with all inference needs
LAST = "last.pth"                 # the last epoch, with all --resume needs
SUMMARY = "summary.csv"           # one row per epoch
PER_CLASS = "per_class.csv"       # the best epoch's (k-fold: the out-of-fold) per-class scores
CONFUSION = "confusion.png"       # the best epoch's (k-fold: the out-of-fold) confusion matrices
DONE = "done.json"                # written last, once the run (a fold; a k-fold run: all) finished
FOLDS = "folds.csv"               # k-fold: profile -> fold
OOF = "oof.csv"                   # k-fold: every photo scored by the fold model that never saw it
OOF_METRICS = "oof_metrics.json"  # k-fold: the out-of-fold scores
CALIBRATION = "calibration.json"  # inference.py --fit_calibration: per-class offsets
RUN_ID = "run_id"                 # config.json's and every checkpoint's: which run they belong to
TRACKING = "tracking"             # config.json's: commit, command line, start, crop used (no setting)
NOTE = "note.json"                # experiments.py note: leaderboard scores and notes, latest last
MISTAKES = "mistakes.png"         # the most confident mistakes (best epoch's val; k-fold: OOF)
MISTAKES_CSV = "mistakes.csv"     # ... the same photos: path in the data folder, truth, prediction

SUMMARY_FIELDS = ["epoch", "train_loss", "val_loss", "val_f1", "val_acc", "f1_mask", "f1_gender",
                  "f1_age", "lr", "seconds", "images_per_s", "val_f1_ema"]
PER_CLASS_FIELDS = ["class", "precision", "recall", "f1", "support"]


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The folder of fold ``fold`` of a k-fold run."""
    return Path(run_dir) / f"fold{fold}"


def fold_dirs(run_dir: Path) -> list[Path]:
    """The fold folders a k-fold run has on disk, in fold order."""
    found = [d for d in Path(run_dir).glob("fold*") if d.is_dir() and d.name[4:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[4:]))


def last_checkpoints(run_dir: Path) -> list[Path]:
    """Every last.pth of a run (its own, then its folds'), in that order."""
    lasts = [Path(run_dir) / LAST, *(d / LAST for d in fold_dirs(run_dir))]
    return [p for p in lasts if p.is_file()]


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of a run: last.pth then best.pth, its own, then each fold's."""
    folders = [Path(run_dir), *fold_dirs(run_dir)]
    return [p for d in folders for p in (d / LAST, d / BEST) if p.is_file()]


def new_run_id(record: dict | None = None) -> str:
    """A new run's identity, written into config.json and every checkpoint. Folds trained apart
    (--fold, possibly side by side from a shell loop) may each start the shared folder, so theirs
    is derived from what defines the experiment (``record``): the same flags, the same id."""
    if record is None:
        return uuid.uuid4().hex
    return "folds-" + hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def _plain(value: object) -> object:
    """A setting as config.json holds it (tuples as lists), for comparison."""
    return json.loads(json.dumps(value))


def check_run_record(run_dir: Path, recorded: dict, checkpoints: dict[Path, dict],
                     may_differ: tuple[str, ...]) -> dict:
    """What a run is: its config.json (``recorded``) checked against ``checkpoints`` (path ->
    loaded checkpoint, run_checkpoints'), the one place every door into a run (--resume, another
    --fold, inference) asks. Every checkpoint must carry the run's id, and every last.pth the
    settings the record holds (but ``may_differ``: flags that only say how long or where it
    runs); a key missing from config.json is taken from them (they trained with it). In each folder best.pth's
    epoch must be the best epoch its last.pth and done.json name. Returns the record completed;
    UserError naming the file otherwise."""
    record = dict(recorded)
    ids = {path: ck.get(RUN_ID) for path, ck in checkpoints.items() if isinstance(ck, dict)}
    run_id = record.get(RUN_ID)
    for path, ck in checkpoints.items():
        if not isinstance(ck, dict):
            continue
        theirs = ids[path]
        if run_id is None and theirs is not None:
            run_id = record[RUN_ID] = theirs  # config.json lost its id: the checkpoints keep it
        if theirs is not None and theirs != run_id:
            raise UserError(f"{path}: belongs to another run (run id {theirs}; {run_dir / CONFIG} "
                            f"records {run_id}); put back the run's own checkpoint or start a "
                            "new run")
        trained = ck.get("config")
        if path.name != LAST or not isinstance(trained, dict):
            # the settings are last.pth's, which the run continues from (best.pth: its identity
            # and epoch); a checkpoint of an earlier version records none
            continue
        for key, value in trained.items():
            if key in may_differ or key == RUN_ID:
                continue
            if key not in record:
                record[key] = value  # deleted from config.json: what the run trained with
            elif _plain(record[key]) != _plain(value):
                raise UserError(f"{run_dir / CONFIG}: '{key}' is {json.dumps(_plain(record[key]))} "
                                f"but {path} trained with {json.dumps(_plain(value))}; the record "
                                "and the checkpoint disagree (edited, or a checkpoint of another "
                                "run?); restore one of them or start a new run")
    for folder in {p.parent for p in checkpoints}:
        check_best_epoch(folder, checkpoints.get(folder / LAST), checkpoints.get(folder / BEST))
    return record


def check_best_epoch(folder: Path, last: dict | None, best: dict | None) -> None:
    """best.pth holds the epoch that last.pth (and done.json) name as the best: a best.pth of
    another epoch would make the summary claim weights the file does not hold."""
    if not isinstance(best, dict) or not isinstance(best.get("epoch"), int):
        return
    claims = []
    if isinstance(last, dict) and isinstance(last.get("train_state"), dict):
        claims.append((folder / LAST, last["train_state"].get("best_epoch")))
    done = folder / DONE
    if done.is_file():
        try:
            claims.append((done, json.loads(done.read_text()).get("best_epoch")))
        except (ValueError, AttributeError):
            raise UserError(f"{done}: not a readable done.json") from None
    for where, epoch in claims:
        if isinstance(epoch, int) and epoch != best["epoch"]:
            raise UserError(f"{folder / BEST}: holds epoch {best['epoch']}, but {where} names "
                            f"epoch {epoch} as the best; the run's files disagree (a copied "
                            "checkpoint?)")


def check_folds(run_dir: Path, folds: pd.Series, written: pd.Series | None,
                recorded: pd.DataFrame | None) -> None:
    """A k-fold run's folds are decided once: ``folds`` (profile -> fold, what this call trains
    and scores with) must be the run's folds.csv (``written``, read by dataset.read_folds) when it
    has one, and the roles its photos.csv
    recorded (``recorded``: path-indexed, with profile and role). Otherwise a fold model could
    score, out of fold, people it trained on."""
    folds_file = Path(run_dir) / FOLDS
    if written is not None:
        common = folds.index.intersection(written.index)
        moved = common[written.loc[common].to_numpy() != folds.loc[common].to_numpy()]
        if len(moved) or len(common) < len(folds):
            first = moved[0] if len(moved) else folds.index.difference(written.index)[0]
            raise UserError(f"{folds_file}: differs from this run's folds (first: {first}); a "
                            "k-fold run keeps the folds it started with (--fold into an existing "
                            "run uses them; --folds FILE makes a new run on them)")
    if recorded is not None and len(recorded):
        expected = recorded["profile"].map(folds).astype("Int64").astype(str)
        wrong = recorded.index[expected.to_numpy() != recorded["role"].astype(str).to_numpy()]
        if len(wrong):
            raise UserError(f"{folds_file}: photo {wrong[0]} is in fold {expected.loc[wrong[0]]} "
                            f"but {Path(run_dir) / PHOTOS} recorded {recorded.loc[wrong[0], 'role']} "
                            "when the run started; folds.csv was changed, put back the run's own")


def new_run_dir(model_dir: str | Path, name: str) -> Path:
    """{model_dir}/{name}, else {name}2, {name}3, ... (created, so parallel runs never share one).
    The number is appended to the whole name, so dotted names like 'lr1e-3.v2' number right."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = root / (name if number == 1 else f"{name}{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def prepare_run_dir(settings, photos: pd.DataFrame, record: dict | None = None) -> Path:
    """The run folder, with config.json (``record``, else the settings') and photos.csv written
    together: --resume's, {name} itself when one fold of a shared k-fold run is trained (--fold),
    else a new {name}, {name}2, ..."""
    if settings.resume:
        run_dir = Path(settings.resume)
        remove_stale_temps(run_dir, ".*.tmp")  # a checkpoint save cut short by a kill
    elif settings.fold is not None:
        run_dir = Path(settings.model_dir) / settings.name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(settings.model_dir, settings.name)
    record = settings.record() if record is None else record
    write_together({run_dir / CONFIG: json.dumps(record, indent=2).encode(),
                    run_dir / PHOTOS: photos.to_csv(index=False).encode()})
    return run_dir


def read_recorded_epochs(run_dir: Path) -> int | None:
    """The "epochs" a run's config.json records, None when it records none readable."""
    try:
        epochs = json.loads((Path(run_dir) / CONFIG).read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    return epochs if isinstance(epochs, int) else None


def remove_if_no_checkpoint(run_dir: Path) -> None:
    """A new run that failed before its first checkpoint (no weights offline, a loss that blew up
    at once, out of memory) leaves no folder behind: it would only hold a config and an empty log."""
    if not any(run_dir.rglob("*.pth")):
        shutil.rmtree(run_dir, ignore_errors=True)


def write_per_class(path: Path, per_class: dict) -> None:
    """per_class.csv: precision, recall, F1 and support of every class (predict.per_class_scores)."""
    table = pd.DataFrame([{"class": name, **scores} for name, scores in per_class.items()],
                         columns=PER_CLASS_FIELDS)
    atomic_write_text(path, table.to_csv(index=False, float_format="%.4f"))


def write_summary(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def photo_record(frame: pd.DataFrame, data_dir: Path, roles) -> pd.DataFrame:
    """One row per photo of the run: path (inside the data folder), profile, label, its content
    digest (what the image cache is keyed by) and its role: train or val, or its fold."""
    from maskface.image_cache import photo_digests  # OpenCV: not for ensemble_csv.py's start
    return pd.DataFrame({"path": [os.path.relpath(p, data_dir) for p in frame["path"]],
                         "profile": frame["profile"].to_numpy(), "label": frame["label"].to_numpy(),
                         "digest": photo_digests(frame["path"].tolist()),
                         "role": roles})


def data_fingerprint(photos: pd.DataFrame) -> str:
    """The training data in one value (paths, contents, labels): kept in every checkpoint."""
    rows = photos[["path", "digest", "label"]].sort_values("path").to_csv(index=False)
    return hashlib.sha1(rows.encode()).hexdigest()[:16]


def continued_photos(args: argparse.Namespace, frame: pd.DataFrame, data_dir: Path,
                     say=print) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """--resume: today's photos checked against the run's photos.csv. Photos added, removed or
    changed (content or label) since the run started are named and refused, unless
    --accept_data_change: then the run goes on with the photos it still has (new people are left
    out). Returns (the frame to continue on, the recorded photos) — (frame, None) for a run of an
    earlier version without photos.csv, whose k-fold folds.csv still decides who validates where."""
    run_dir = Path(args.resume)
    recorded_file = run_dir / PHOTOS
    if not recorded_file.is_file():
        say(f"warning: {run_dir} has no {PHOTOS} (a run of an earlier version): today's data "
            "cannot be checked against what it trained on")
        return frame, None
    # every cell as text: a hex digest such as '12e4...' must not turn into a number
    recorded = read_csv_checked(recorded_file, ["path", "profile", "label", "digest", "role"],
                                dtype=str)
    recorded["label"] = check_labels(recorded["label"], str(recorded_file), "label")
    today = photo_record(frame, data_dir, roles=None)
    before, now = recorded.set_index("path"), today.set_index("path")
    added = now.index.difference(before.index)
    removed = before.index.difference(now.index)
    both = now.index.intersection(before.index)
    changed = both[(now.loc[both, "digest"] != before.loc[both, "digest"])
                   | (now.loc[both, "label"] != before.loc[both, "label"])]
    differences = [f"{len(paths)} photo(s) {what} (first: {paths[0]})"
                   for what, paths in (("added", added), ("removed", removed),
                                       ("changed in content or label", changed)) if len(paths)]
    if differences and not args.accept_data_change:
        raise UserError(f"--resume {run_dir}: the training data changed since the run started: "
                        f"{'; '.join(differences)}; add --accept_data_change to go on with the "
                        "photos the run still has (new ones left out), or start a new run")
    if differences:
        say(f"warning: --accept_data_change: {'; '.join(differences)}; the run goes on with the "
            "photos it still has")
    keep = today["path"].isin(before.index).to_numpy()
    return frame[keep].reset_index(drop=True), recorded.set_index("path").loc[today["path"][keep]]


def read_notes(run_dir: Path) -> list[dict]:
    """The notes of a run (experiments.py note), oldest first; [] when it has none. UserError
    naming note.json when it is not a list of notes."""
    path = Path(run_dir) / NOTE
    if not path.exists():
        return []
    notes = read_json_checked(path).get("notes")
    if not isinstance(notes, list) or not all(isinstance(n, dict) for n in notes):
        raise UserError(f"{path}: expected {{\"notes\": [{{\"time\", \"lb\", \"text\"}}, ...]}}")
    return notes


def add_note(run_dir: Path, lb: float | None, text: str | None) -> list[dict]:
    """One more note (a leaderboard score, a text, or both, stamped UTC) in the run's note.json,
    written whole; every earlier note is kept. Returns the notes."""
    notes = [*read_notes(run_dir), {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "lb": lb, "text": text}]
    atomic_write_text(Path(run_dir) / NOTE, json.dumps({"notes": notes}, indent=2))
    return notes


def latest_note(notes: list[dict]) -> dict:
    """{"lb", "note"}: the latest leaderboard score and the latest text among ``notes`` (a note
    with only a text keeps the score before it, and the other way round)."""
    lbs = [n["lb"] for n in notes if isinstance(n.get("lb"), (int, float))
           and not isinstance(n.get("lb"), bool)]
    texts = [n["text"] for n in notes if isinstance(n.get("text"), str) and n["text"]]
    return {"lb": float(lbs[-1]) if lbs else None, "note": texts[-1] if texts else None}
