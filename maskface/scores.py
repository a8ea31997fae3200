"""Scores against known answers: macro F1 (the competition's metric, scikit-learn's), accuracy,
per-head F1, each class's precision, recall, F1 and support, the confusion matrix, and the report
that inference.py --answers and ensemble_csv.py --answers print. numpy and pandas at import;
scikit-learn only when something is scored, so ensemble_csv.py still starts without it."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from maskface import labels
from maskface.cli import UserError
from maskface.labels import NUM_CLASSES, check_labels


def per_class_scores(truth: np.ndarray, predicted: np.ndarray, category: str) -> dict:
    """{class name: {precision, recall, f1, support}} for every class of ``category``, from
    scikit-learn's classification_report (a class never predicted scores 0, not a warning).
    Macro F1 is the mean of these F1s over the classes present in truth or predictions."""
    from sklearn.metrics import classification_report  # slow to import: ensemble_csv's start
    names = labels.class_names(category)
    report = classification_report(truth, predicted, labels=np.arange(len(names)),
                                   target_names=names, output_dict=True, zero_division=0)
    return {name: {"precision": float(report[name]["precision"]),
                   "recall": float(report[name]["recall"]),
                   "f1": float(report[name]["f1-score"]),
                   "support": int(report[name]["support"])} for name in names}


def worst_class(per_class: dict) -> tuple[str, float] | None:
    """(name, F1) of the class with the lowest F1 among those with photos; None without any."""
    present = [(name, row["f1"]) for name, row in per_class.items() if row["support"]]
    return min(present, key=lambda item: item[1]) if present else None


def label_scores(truth: np.ndarray, predicted: np.ndarray, category: str) -> dict:
    """Macro F1, accuracy, for 18 classes per-head F1, and 'per_class' (per_class_scores), of
    predicted against true labels of ``category``."""
    from sklearn.metrics import f1_score
    metrics = {"f1": f1_score(truth, predicted, average="macro"),
               "acc": float((truth == predicted).mean())}
    if category == "multi":
        for head, t, p in zip(("mask", "gender", "age"), labels.decode_class(truth),
                              labels.decode_class(predicted)):
            metrics[f"f1_{head}"] = f1_score(t, p, average="macro")
    metrics["per_class"] = per_class_scores(truth, predicted, category)
    return metrics


def check_answers(answers: pd.DataFrame, image_ids: Sequence[str], where: str,
                  against: str = "info.csv") -> None:
    """The answers must hold exactly the ImageIDs being scored (``against`` names where they
    come from), once each, with labels 0..17."""
    given, expected = answers["ImageID"], set(image_ids)
    extra = sorted(set(given) - expected)
    absent = sorted(expected - set(given))
    doubled = sorted(set(given[given.duplicated()]))
    for problem, ids in ((f"not in {against}", extra), (f"of {against} missing", absent),
                         ("listed twice", doubled)):
        if ids:
            raise UserError(f"{where}: {len(ids)} ImageID(s) {problem}, e.g. {ids[0]}; "
                            f"the answers must match {against}'s ImageIDs")
    check_labels(answers["ans"], where)


def score_answers(predictions: pd.DataFrame, answers_df: pd.DataFrame) -> dict:
    """Macro F1 (sklearn), accuracy, per-head F1 and the 18x18 confusion matrix (rows: truth) of
    a submission (ImageID, ans) against the answers (ImageID, ans)."""
    from sklearn.metrics import confusion_matrix
    check_answers(answers_df, predictions["ImageID"].tolist(), "answers")
    truth = answers_df.set_index("ImageID")["ans"].loc[predictions["ImageID"]].to_numpy(int)
    predicted = predictions["ans"].to_numpy(int)
    metrics = label_scores(truth, predicted, "multi")
    metrics["confusion"] = confusion_matrix(truth, predicted, labels=list(range(NUM_CLASSES)))
    return metrics


def print_scores(metrics: dict, say: Callable[[str], None] = print) -> None:
    say(f"answers: macro F1 {metrics['f1']:.4f}, accuracy {metrics['acc']:.4f} | F1 mask "
        f"{metrics['f1_mask']:.4f}, gender {metrics['f1_gender']:.4f}, age {metrics['f1_age']:.4f}")
    per_class = pd.DataFrame.from_dict(metrics["per_class"], orient="index")
    worst = worst_class(metrics["per_class"])
    say("per class (macro F1 is the mean of the f1 column over the classes present"
        + (f"; worst: {worst[0]}" if worst else "") + "):\n"
        + per_class.to_string(float_format=lambda v: f"{v:.4f}"))
    table = pd.DataFrame(metrics["confusion"], index=[f"t{c}" for c in range(NUM_CLASSES)],
                         columns=[f"p{c}" for c in range(NUM_CLASSES)])
    say("confusion matrix (rows: true class, columns: predicted):\n" + table.to_string())
