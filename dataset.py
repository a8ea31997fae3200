"""Data layer: labels (the one place the class formula lives), layout parsing, relabeling, splits
and folds, and the batches that read the decode-once image cache (image_cache.py).

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

from checked_io import NUM_CLASSES, UserError, file_inside, problems_error, read_csv_checked


MASK_NAMES = ("wear", "incorrect", "not_wear")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("<30", "30-59", "60+")
HEAD_SIZES = (3, 2, 3)  # mask, gender, age: the three heads of a multi-head model

# photo stem -> mask state; mask1..mask5 are all "wear"
MASK_BY_STEM = {
    "mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
PHOTO_STEMS = tuple(MASK_BY_STEM)
GENDER_BY_NAME = {name: i for i, name in enumerate(GENDER_NAMES)}

# number of classes each --category predicts
CATEGORY_CLASSES = {"multi": NUM_CLASSES, "mask": 3, "gender": 2, "age": 3}
OLD_AGE = 60  # default first age of the "60+" group


def age_group(age, old_age: int = OLD_AGE):
    """Years -> 0 (<30), 1 (30..old_age-1), 2 (>=old_age); scalars or arrays."""
    age = np.asarray(age)
    group = np.where(age < 30, 0, np.where(age < old_age, 1, 2))
    return int(group) if group.ndim == 0 else group


def age_bin6(age, old_age: int = OLD_AGE):
    """Years -> 0..5 for <20, 20s, 30s, 40s, 50s, 60+ (the --age_label_num 6 bins)."""
    age = np.asarray(age)
    bins = np.clip(age // 10 - 1, 0, 4)
    bins = np.where(age >= old_age, 5, bins)
    return int(bins) if bins.ndim == 0 else bins


def age6_to_age3(bins):
    """Fold the 6 age bins back to the 3 scored groups (<20,20s -> 0; 30s,40s,50s -> 1; 60+ -> 2)."""
    lookup = np.array([0, 0, 1, 1, 1, 2])
    out = lookup[np.asarray(bins)]
    return int(out) if out.ndim == 0 else out


def encode_class(mask, gender, age):
    """(mask 0..2, gender 0..1, age group 0..2) -> class 0..17; scalars, arrays or tensors."""
    return mask * 6 + gender * 3 + age


def decode_class(label):
    """class 0..17 -> (mask, gender, age group); scalars, arrays or tensors."""
    return label // 6, (label // 3) % 2, label % 3


def category_target(label, category: str):
    """The 18-class label seen by a run of ``category`` (multi returns it unchanged)."""
    if category == "multi":
        return label
    mask, gender, age = decode_class(label)
    return {"mask": mask, "gender": gender, "age": age}[category]


AGE6_NAMES = ("<20", "20s", "30s", "40s", "50s", "60+")  # the --age_label_num 6 bins


def class_names(category: str = "multi", age_label_num: int = 3) -> list[str]:
    """Readable names of a run's classes, by index: '09 incorrect-female-<30' for the 18 classes
    (class = mask*6 + gender*3 + age), '1 female' for --category gender. With age_label_num 6,
    the training targets' names (36 for multi, whose index is (mask*2 + gender)*6 + age bin)."""
    ages = AGE6_NAMES if age_label_num == 6 else AGE_NAMES
    if category == "multi":
        names = [f"{m}-{g}-{a}" for m in MASK_NAMES for g in GENDER_NAMES for a in ages]
    else:
        names = list({"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": ages}[category])
    width = len(str(len(names) - 1))
    return [f"{c:0{width}d} {name}" for c, name in enumerate(names)]


def heads_to_class_probs(mask_probs, gender_probs, age_probs):
    """Per-head probabilities [..., 3], [..., 2], [..., 3] -> 18-class probabilities [..., 18].

    The joint is the product of the heads (they are treated as independent), laid out so that
    index encode_class(m, g, a) holds p(m) * p(g) * p(a). Works on numpy arrays and torch tensors.
    """
    joint = (mask_probs[..., :, None, None] * gender_probs[..., None, :, None]
             * age_probs[..., None, None, :])
    return joint.reshape(*joint.shape[:-3], NUM_CLASSES)


def class_probs_to_heads(probs):
    """18-class probabilities [..., 18] -> marginals (mask [...,3], gender [...,2], age [...,3])."""
    joint = probs.reshape(*probs.shape[:-1], 3, 2, 3)
    return joint.sum(-1).sum(-1), joint.sum(-1).sum(-2), joint.sum(-2).sum(-2)

# ----------------------------------------------------------------------------------------------
# Layout parsing: folders -> one record (a DataFrame row) per photo
# ----------------------------------------------------------------------------------------------


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
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


def train_images_dir(data_dir: str | Path) -> Path:
    """The folder of person folders: ``data_dir`` itself, or its ``images/`` when ``data_dir`` is
    the competition's train/ (holding images/ and train.csv)."""
    path = Path(data_dir)
    if (path / "images").is_dir() and not any(PROFILE_PATTERN.match(p.name) for p in path.iterdir()):
        return path / "images"
    return path


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


def num_outputs(category: str, age_label_num: int = 3) -> int:
    """Model output width for a run's category and age bins."""
    if age_label_num == 6:
        return {"multi": 36, "mask": 3, "gender": 2, "age": 6}[category]
    return CATEGORY_CLASSES[category]


def fold_age6(probs, category: str):
    """Probabilities over 6 age bins (age: [...,6]; multi: [...,36]) -> the scored 3 groups."""
    groups = age6_to_age3(np.arange(6))
    if category == "age":
        return np.stack([probs[..., groups == g].sum(-1) for g in range(3)], -1)
    joint = probs.reshape(*probs.shape[:-1], 3, 2, 6)
    folded = np.stack([joint[..., groups == g].sum(-1) for g in range(3)], -1)
    return folded.reshape(*probs.shape[:-1], NUM_CLASSES)


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
        n = len(self.sampler) if self.sampler is not None else len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

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
        return [order[start:start + self.batch_size]
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

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
