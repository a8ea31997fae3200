"""The 18 classes: class = mask*6 + gender*3 + age, their names, the heads of a multi-head model
and the checks of label and probability columns. numpy and pandas only: ensemble_csv.py and the
notebook use it without loading torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from maskface.cli import UserError
from maskface.files import csv_line_names, shown_cell

NUM_CLASSES = 18  # the competition's classes; labels.encode_class says how they are made


PROB_COLUMNS = [f"p{c}" for c in range(NUM_CLASSES)]  # a probability CSV: ImageID, p0..p17


SUM_TOLERANCE = 1e-3  # probabilities written with a few decimals do not sum to exactly 1


def check_labels(values: pd.Series, where: str, column: str = "ans",
                 row_names: Sequence[str] | None = None) -> np.ndarray:
    """Class labels as int64; UserError naming the first bad row (by ``row_names``, else its CSV
    line) and its cell when any is not an integer 0..17."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() | (numbers % 1 != 0) | (numbers < 0) | (numbers >= NUM_CLASSES)).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        name = (row_names[row] if row_names is not None else csv_line_names(len(values))[row])
        raise UserError(f"{where}: {int(bad.sum())} {column} value(s) not an integer "
                        f"0..{NUM_CLASSES - 1} (first: {name}, "
                        f"{column}={shown_cell(values.iloc[row])})")
    return numbers.to_numpy(dtype=np.int64)


def check_probabilities(table: pd.DataFrame, where: str,
                        row_names: Sequence[str] | None = None,
                        columns: Sequence[str] = PROB_COLUMNS) -> np.ndarray:
    """The p0..p17 columns (or ``columns``: p0..p2 of a per-category run) as float64 [N, 18];
    UserError naming the first bad row (by ``row_names``, else its CSV line) when a cell is not
    a number in [0, 1] or a row does not sum to 1 (logits or a truncated file would otherwise
    vote silently)."""
    names = row_names if row_names is not None else csv_line_names(len(table))
    columns = list(columns)
    values = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        name = columns[column]
        raise UserError(f"{where}: {int(bad.sum())} {columns[0]}..{columns[-1]} value(s) not a "
                        f"number in [0, 1] (first: {names[row]}, "
                        f"{name}={shown_cell(table[name].iloc[row])})")
    sums = values.sum(axis=1)
    bad_sums = np.abs(sums - 1) > SUM_TOLERANCE
    if bad_sums.any():
        row = int(bad_sums.argmax())
        raise UserError(f"{where}: {int(bad_sums.sum())} row(s) whose {columns[0]}..{columns[-1]} "
                        f"do not sum to 1 (first: {names[row]}, sum {sums[row]:.4f})")
    return values


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
