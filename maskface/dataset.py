"""The data: the competition's layout parsed into one record per photo, relabeling, splits and
folds (grouped by person), and the batches that read the decode-once image cache (image_cache.py).
Labels come from labels.py, the one place the class formula lives. Add a split rule here (SPLITS).

A dataset is one DataFrame row per photo (RECORD_COLUMNS, then add_labels), made by the parser and
read by every consumer (splits, cache, training, inference, the notebook), so labels are decided once.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from maskface.cli import UserError, problems_error
from maskface.files import file_inside, read_csv_checked, shown_cell
from maskface.image_cache import IMAGE_EXTENSIONS
from maskface.labels import (
    GENDER_BY_NAME,
    MASK_BY_STEM,
    OLD_AGE,
    PHOTO_STEMS,
    age_bin6,
    age_group,
    category_target,
    encode_class,
)

# Layout parsing: folders -> one record (a DataFrame row) per photo
# ----------------------------------------------------------------------------------------------


PROFILE_PATTERN = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[^_]+)_(?P<race>.+)_(?P<age>[^_]+)$")
RECORD_COLUMNS = ["path", "profile", "id", "gender", "race", "age", "mask", "stem"]
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in _MAGIC)


def parse_profile_name(name: str) -> dict:
    """'000001_female_Asian_45' -> {'id', 'gender', 'race', 'age'}; raises ValueError why not."""
    match = PROFILE_PATTERN.match(name)
    if not match:
        raise ValueError("folder name does not parse; expected <id>_<gender>_<race>_<age>")
    gender = match["gender"].lower()
    if gender not in GENDER_BY_NAME:
        raise ValueError(f"gender '{match['gender']}' is not male/female")
    return {"id": match["id"], "gender": GENDER_BY_NAME[gender], "race": match["race"],
            "age": parse_age(match["age"])}


MAX_AGE = 150  # years; a larger number is a typo, and would overflow no integer column


def parse_age(text: str) -> int:
    """An age in years written with ASCII digits (str.isdigit would take '²' or '٤٥'), 0..150;
    ValueError saying why not."""
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > MAX_AGE:
        raise ValueError(f"age '{text}' is not a number of years 0..{MAX_AGE}")
    return int(text)


def parse_train_dir(data_dir: str | Path, relabel: str | Path | None = None,
                    warn=print) -> pd.DataFrame:
    """Read the competition's train layout into one row per photo, sorted by path.

    Every problem is collected and raised at once as a UserError (one line per path); profiles with
    missing photos are only warned about. ``relabel`` applies a relabel CSV (see apply_relabel).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist or is not a folder")
    problems: list[str] = []
    rows: list[dict] = []
    incomplete = 0
    for folder in sorted(data_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            profile = parse_profile_name(folder.name)
        except ValueError as why:
            problems.append(f"{folder}: {why}")
            continue
        seen: dict[str, Path] = {}
        for photo in sorted(folder.iterdir()):
            if photo.name.startswith("."):
                continue
            stem, ext = photo.stem, photo.suffix.lower()
            if stem not in MASK_BY_STEM or ext not in IMAGE_EXTENSIONS:
                warn(f"warning: {photo}: ignored (expected one of {', '.join(PHOTO_STEMS)} "
                     f"with extension {'/'.join(IMAGE_EXTENSIONS)})")
                continue
            if stem in seen:
                problems.append(f"{photo}: duplicate photo, {seen[stem].name} is the same photo")
                continue
            seen[stem] = photo
            if not _looks_like_image(photo):
                problems.append(f"{photo}: unreadable or not a JPEG/PNG image")
                continue
            rows.append({"path": str(photo), "profile": folder.name, **profile,
                         "mask": MASK_BY_STEM[stem], "stem": stem})
        missing = [s for s in PHOTO_STEMS if s not in seen]
        if missing:
            incomplete += 1
            warn(f"warning: {folder}: missing photo(s) {', '.join(missing)}")
    if problems:
        raise problems_error(problems, f"the train layout under {data_dir}")
    if not rows:
        raise UserError(f"no photos found under {data_dir}; expected folders "
                        "<id>_<gender>_<race>_<age>/ with mask1..5, incorrect_mask, normal images")
    frame = pd.DataFrame(rows, columns=RECORD_COLUMNS).sort_values("path", ignore_index=True)
    if relabel is not None:
        frame = apply_relabel(frame, relabel, warn=warn)
    return frame


def add_labels(frame: pd.DataFrame, old_age: int = OLD_AGE) -> pd.DataFrame:
    """Add the scored labels (age group, 18-class ``label``, always with the true 60 boundary) and
    ``train_age`` / ``train_label`` (with the run's --old_age boundary, used for training only)."""
    frame = frame.copy()
    frame["age_group"] = age_group(frame["age"].to_numpy())
    frame["label"] = encode_class(frame["mask"], frame["gender"], frame["age_group"])
    frame["train_age"] = age_group(frame["age"].to_numpy(), old_age)
    frame["train_label"] = encode_class(frame["mask"], frame["gender"], frame["train_age"])
    return frame


TRUE_VALUES = {"true", "1", "yes", "y", "t"}
FALSE_VALUES = {"false", "0", "no", "n", "f", ""}


def apply_relabel(frame: pd.DataFrame, relabel: str | Path, warn=print) -> pd.DataFrame:
    """Apply a relabel CSV: column ``id`` plus any of ``gender`` (male/female), ``age`` (a number)
    and ``swap_mask`` (true: this person's incorrect_mask and normal photos are swapped).
    Empty cells keep the label. Unknown ids, bad values and a person given two different labels
    are errors naming the line(s)."""
    table = _read_relabel(Path(relabel))
    frame = frame.copy()
    known_ids = set(frame["id"])
    problems, changed, first_line = [], set(), {}
    for line, row in zip(range(2, len(table) + 2), table.to_dict("records")):
        where = f"{relabel}:{line}"
        person = row["id"].strip()
        if person not in known_ids:
            problems.append(f"{where}: id '{person}' is not a profile of the data")
            continue
        if person in first_line:
            earlier = table.iloc[first_line[person] - 2].to_dict()
            if {k: str(v).strip().lower() for k, v in earlier.items()} != \
                    {k: str(v).strip().lower() for k, v in row.items()}:
                problems.append(f"{where}: id '{person}' is relabelled differently on line "
                                f"{first_line[person]}; keep one line per person")
            continue
        first_line[person] = line
        problems += _relabel_person(frame, person, row, where)
        if any(row.get(k, "").strip() for k in ("gender", "age")) or \
                row.get("swap_mask", "").strip().lower() in TRUE_VALUES:
            changed.add(person)
    if problems:
        raise problems_error(problems, f"relabel file {relabel}")
    warn(f"relabel: {len(changed)} people changed by {relabel}")
    return frame


def _read_relabel(relabel: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(relabel, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"relabel file {relabel}: empty; expected a header line id,gender,age,"
                        "swap_mask and one line per person") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as why:
        raise UserError(f"relabel file {relabel}: cannot read ({why})") from None
    allowed = {"id", "gender", "age", "swap_mask"}
    if "id" not in table.columns or not set(table.columns) - {"id"} <= allowed - {"id"}:
        raise UserError(f"relabel file {relabel}: columns {list(table.columns)}; expected 'id' "
                        "and any of gender, age, swap_mask")
    return table


def _relabel_person(frame: pd.DataFrame, person: str, row: dict, where: str) -> list[str]:
    """Apply one relabel line to the photos of ``person`` in place; returns its problems."""
    rows, problems = frame["id"] == person, []
    gender = row.get("gender", "").strip().lower()
    if gender:
        if gender not in GENDER_BY_NAME:
            problems.append(f"{where}: gender '{row['gender']}' is not male/female")
        else:
            frame.loc[rows, "gender"] = GENDER_BY_NAME[gender]
    age = row.get("age", "").strip()
    if age:
        try:
            frame.loc[rows, "age"] = parse_age(age)
        except ValueError as why:
            problems.append(f"{where}: {why}")
    swap = row.get("swap_mask", "").strip().lower()
    if swap not in TRUE_VALUES | FALSE_VALUES:
        problems.append(f"{where}: swap_mask '{row['swap_mask']}' is not true/false")
    elif swap in TRUE_VALUES:
        incorrect, normal = MASK_BY_STEM["incorrect_mask"], MASK_BY_STEM["normal"]
        old = frame.loc[rows, "mask"]
        frame.loc[rows, "mask"] = old.replace({incorrect: normal, normal: incorrect})
    return problems


def parse_eval_dir(eval_dir: str | Path, warn=print) -> pd.DataFrame:
    """Read ``<eval_dir>/info.csv`` (ImageID, ans) -> rows with ImageID and path, in info.csv's order.
    Images that info.csv does not list are not predicted; ``warn`` says how many."""
    eval_dir = Path(eval_dir)
    info_path = eval_dir / "info.csv"
    info = read_csv_checked(info_path, ["ImageID"])
    if info.empty:
        raise UserError(f"{info_path}: no rows; expected one ImageID per eval image")
    problems = [f"{info_path}: row {row + 2} has no ImageID"
                for row in np.flatnonzero(info["ImageID"].isna().to_numpy())]
    if problems:
        raise problems_error(problems, info_path)
    duplicated = info["ImageID"][info["ImageID"].duplicated()]
    problems += [f"{info_path}: ImageID {image_id} appears more than once"
                 for image_id in duplicated]
    info = info.copy()
    # an ImageID names a file inside images/: never an absolute path or one that climbs out
    outside = []
    for line, image_id in enumerate(info["ImageID"], start=2):
        try:
            file_inside(image_id, eval_dir / "images", f"{info_path}:{line}: ImageID")
        except UserError as why:
            outside.append(str(why))
    if outside:
        raise problems_error(outside, info_path)
    info["path"] = [str(eval_dir / "images" / image_id) for image_id in info["ImageID"]]
    for image_id, path in zip(info["ImageID"], info["path"]):
        if not Path(path).is_file():
            problems.append(f"{path}: no image for ImageID {image_id} of {info_path}")
        elif not _looks_like_image(Path(path)):
            problems.append(f"{path}: unreadable or not a JPEG/PNG image")
    if problems:
        raise problems_error(problems, f"the eval layout under {eval_dir}")
    listed = set(info["ImageID"])
    unlisted = sorted(p.name for p in (eval_dir / "images").iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name not in listed)
    if unlisted:
        warn(f"eval: {len(unlisted)} image(s) in {eval_dir / 'images'} are not in {info_path} "
             f"and get no prediction (first: {unlisted[0]})")
    return info


# ----------------------------------------------------------------------------------------------
# Splits: by image (the baseline's, leaky) or by person (default), k folds, balancing
# ----------------------------------------------------------------------------------------------


def _people(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per profile, sorted by profile name so splits never depend on listing order."""
    people = frame.groupby("profile", sort=True).first().reset_index()
    people["stratum"] = people["gender"] * 3 + age_group(people["age"].to_numpy())
    return people


def split_by_image(frame: pd.DataFrame, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random image-level split (the competition baseline's). Leaks: one person's photos land on
    both sides, so its validation score is optimistic. Returns sorted row indices (train, val)."""
    order = np.random.default_rng(seed).permutation(len(frame))
    n_val = int(round(len(frame) * val_ratio))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_by_profile(frame: pd.DataFrame, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """People-level split: exactly round(n_people * val_ratio) people in val, stratified on
    gender x age group where every stratum is big enough. Returns sorted row indices."""
    people = _people(frame)
    n_val = int(round(len(people) * val_ratio))
    if n_val == 0:
        return np.arange(len(frame)), np.array([], dtype=int)
    if n_val >= len(people):
        raise UserError(f"--val_ratio {val_ratio} leaves no training person out of {len(people)}")
    try:
        _, val_people = train_test_split(people["profile"], test_size=n_val, random_state=seed,
                                         stratify=people["stratum"])
    except ValueError:  # a stratum too small to split: fall back to a plain random split
        _, val_people = train_test_split(people["profile"], test_size=n_val, random_state=seed)
    is_val = frame["profile"].isin(set(val_people)).to_numpy()
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# --dataset name -> split function (the competition's names for them)
SPLITS = {
    # image-level random split, kept for parity with the competition baseline. It LEAKS: the
    # same person appears in train and val, so validation F1 is optimistic
    "MaskBaseDataset": split_by_image,
    # people-level split stratified on gender x age (the default): no person on both sides
    "MaskSplitByProfileDataset": split_by_profile,
}


def kfold_assignments(frame: pd.DataFrame, n_folds: int, seed: int, category: str = "multi",
                      warn=print) -> pd.Series:
    """Fold number per profile (index: profile) from StratifiedGroupKFold grouped by person and
    stratified on the 18 classes (or the run's category). A class with fewer people than folds
    is missing from some folds' validation: ``warn`` says so in one line."""
    if n_folds < 2:
        raise UserError(f"--kfold {n_folds}: need at least 2 folds")
    n_people = frame["profile"].nunique()
    if n_folds > n_people:
        raise UserError(f"--kfold {n_folds}: only {n_people} people to split")
    ordered = frame.sort_values("path")
    labels = add_labels(ordered) if "label" not in ordered else ordered
    y = category_target(labels["label"].to_numpy(), category)
    people_per_class = ordered.groupby(y)["profile"].nunique()
    rare = people_per_class[people_per_class < n_folds]
    if len(rare):
        warn(f"folds: {len(rare)} class(es) have fewer people than the {n_folds} folds "
             f"(class {rare.index[0]}: {rare.iloc[0]}), so some folds validate without them")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = {}
    with warnings.catch_warnings():  # said above in one line, instead of sklearn's two
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splits = list(splitter.split(ordered, y, groups=ordered["profile"]))
    for fold, (_, val_rows) in enumerate(splits):
        for profile in ordered["profile"].iloc[val_rows].unique():
            fold_of[profile] = fold
    return pd.Series(fold_of, name="fold").rename_axis("profile").sort_index()


def read_folds(path: str | Path) -> pd.Series:
    """folds.csv (profile, fold) -> fold by profile; every cell checked, the first bad line named."""
    table = read_csv_checked(path, ["profile", "fold"], dtype=str)
    for line, (profile, fold) in enumerate(zip(table["profile"], table["fold"]), start=2):
        if pd.isna(profile) or not str(profile).strip():
            raise UserError(f"{path}:{line}: empty profile; expected <id>_<gender>_<race>_<age>")
        if pd.isna(fold) or not str(fold).strip().isdigit() or not str(fold).isascii():
            raise UserError(f"{path}:{line}: fold {shown_cell(fold)} for {profile}; expected a "
                            "fold number 0, 1, ...")
    doubled = table["profile"][table["profile"].duplicated()]
    if len(doubled):
        raise UserError(f"{path}: profile {doubled.iloc[0]} is given more than one fold")
    return table.set_index("profile")["fold"].astype(int)


BALANCING = ("imbalance", "10s", "gene")


def balance_people(frame: pd.DataFrame, train_rows: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """People-level oversampling of the TRAIN rows only: every group (gender x decade for '10s',
    gender x age group for 'gene') is brought up to the size of the largest; a fractional expected
    repetition count is rounded stochastically with ``seed``. Returns train rows with repeats."""
    if mode == "imbalance":
        return train_rows
    if mode not in BALANCING:
        raise UserError(f"unknown --data_balancing '{mode}'; choose one of: {', '.join(BALANCING)}")
    people = _people(frame.iloc[train_rows])
    if mode == "10s":
        people["group"] = people["gender"] * 10 + np.minimum(people["age"] // 10, 6)
    else:
        people["group"] = people["stratum"]
    sizes = people["group"].map(people["group"].value_counts())
    expected = sizes.max() / sizes
    rng = np.random.default_rng(seed)
    repeats = np.floor(expected).astype(int) + (rng.random(len(people)) < expected % 1)
    repeat_of = dict(zip(people["profile"], repeats))
    train_profiles = frame["profile"].to_numpy()[train_rows]
    counts = np.array([repeat_of[p] for p in train_profiles])
    return np.repeat(train_rows, counts)


def training_targets(frame: pd.DataFrame, category: str, age_label_num: int = 3,
                     old_age: int = OLD_AGE) -> np.ndarray:
    """Targets a model is trained on: the category's classes, with the run's old-age boundary
    (train_label) and, for age_label_num 6, the 6 age bins (36 classes for multi)."""
    mask, gender = frame["mask"].to_numpy(), frame["gender"].to_numpy()
    if age_label_num == 6:
        age = age_bin6(frame["age"].to_numpy(), old_age)
        return {"multi": (mask * 2 + gender) * 6 + age, "mask": mask, "gender": gender,
                "age": age}[category]
    return category_target(frame["train_label"].to_numpy(), category)


# ----------------------------------------------------------------------------------------------
# Batches: uint8 from the cache -> the device, where augmentation runs on whole batches
# ----------------------------------------------------------------------------------------------
class CachedBatches:
    """Iterate (uint8 images [B,H,W,C], targets [B], rows [B]) from a cache on ``device``.

    The cache is copied to the device whole when it fits (GPU: under ``max_device_fraction`` of
    the free memory; CPU: under ``max_host_bytes``), else each batch is gathered from the memmap
    and sent pinned and non-blocking. Shuffling draws from torch's global RNG (seeded by the run,
    saved in checkpoints), ``weights`` switch to sampling with replacement (--weightsampler), and
    a ``sampler`` over range(len(rows)) (DistributedSampler under torchrun) decides the order.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, rows: np.ndarray,
                 batch_size: int, device: torch.device | str = "cpu", shuffle: bool = False,
                 drop_last: bool = False, weights: np.ndarray | None = None,
                 preload: bool | None = None, max_device_fraction: float = 0.5,
                 max_host_bytes: int = 4 << 30, sampler=None):
        self.device = torch.device(device)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.sampler = sampler
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        unique_rows, self.position = np.unique(self.rows, return_inverse=True)
        needed = len(unique_rows) * int(np.prod(images.shape[1:]))
        if preload is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                preload = needed < free * max_device_fraction
            else:
                preload = needed < max_host_bytes
        self.images = images
        self.resident = None
        if preload:
            self.resident = torch.from_numpy(np.ascontiguousarray(images[unique_rows])).to(self.device)
            self.position = torch.as_tensor(self.position, device=self.device)
        self.targets = self.targets.to(self.device)

    def __len__(self) -> int:
        return len(self._bounds())

    def _bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each batch. A training pass's (shuffled, sampled or weighted) last
        batch of one image is merged into the one before: BatchNorm cannot train on a single
        image ("Expected more than 1 value per channel"), and merging leaves every other batch
        size (and so every run without such a tail) as is. Evaluation batches, in order, keep
        their tail: a model in eval mode scores one image fine."""
        n = len(self.sampler) if self.sampler is not None else len(self.rows)
        count = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        bounds = [(start, min(start + self.batch_size, n))
                  for start in range(0, count * self.batch_size, self.batch_size)]
        training = self.shuffle or self.weights is not None or self.sampler is not None
        if training and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
        return bounds

    def _order(self) -> torch.Tensor:
        n = len(self.rows)
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.weights is not None:
            return torch.multinomial(self.weights, n, replacement=True)
        return torch.randperm(n) if self.shuffle else torch.arange(n)

    def batch_picks(self) -> list[torch.Tensor]:
        """This pass's batches as positions in ``rows`` (draws the order: shuffling moves the RNG)."""
        order = self._order()
        return [order[start:stop] for start, stop in self._bounds()]

    def __iter__(self):
        for picks in self.batch_picks():
            if self.resident is not None:
                on_device = picks.to(self.device)
                images = self.resident[self.position[on_device]]
            else:
                batch = torch.from_numpy(self.images[self.rows[picks.numpy()]])
                if self.device.type == "cuda":
                    batch = batch.pin_memory()
                images = batch.to(self.device, non_blocking=True)
                on_device = picks.to(self.device)
            yield images, self.targets[on_device], self.rows[picks.numpy()]
