"""Predict the eval set from trained run folders and write the competition's submission.

    python inference.py --model_dir model/exp                        # one model
    python inference.py --model_dir model/kfold model/exp2 --ensemble --tta flip
    python inference.py --model_dir model/exp --answers eval/answers.csv   # also score it
    python inference.py --fit_calibration model/kfold                # offsets from oof.csv
    python inference.py --ensemble model/selection.json              # experiments.py select's mix

Every model is rebuilt from its checkpoint alone (architecture, preprocessing, normalization,
category), so no training flag is repeated here; maskface/submission.py does the work.
"""
from __future__ import annotations

import argparse
import os
import sys

from maskface.cli import FlagParser, LazyChoices, registry, run_cli
from maskface.ensemble import VOTING_RULE
from maskface.run_folder import CALIBRATION


def tta_views(text: str) -> str:
    """--tta as given, checked against the view registry (predict.tta_view_names; torch loads
    only when --tta is given, so --help stays quick)."""
    from maskface.predict import tta_view_names
    try:
        return ",".join(tta_view_names(text)) or "none"
    except ValueError as why:
        raise argparse.ArgumentTypeError(f"{text!r}: {why}") from None


def get_args_parser() -> FlagParser:
    p = FlagParser(description="Write the submission CSV from trained run folders. Every flag is "
                               "also accepted with hyphens (--model-dir).", epilog=VOTING_RULE)
    add = p.add_argument
    add("--model_dir", nargs="+", action="extend", default=None, metavar="RUN_DIR",
        help="run folder(s) of train.py, or best.pth files; repeatable (when not given: "
             "$SM_CHANNEL_MODEL, else ./model/exp)")
    add("--data_dir", default=None, metavar="EVAL_DIR",
        help="folder with info.csv and images/ ($SM_CHANNEL_EVAL, else the bundled sample)")
    add("--output_dir", default=os.environ.get("SM_OUTPUT_DATA_DIR", "./output"),
        help="where the CSVs go ($SM_OUTPUT_DATA_DIR if set)")
    add("--name_csv", default="output.csv", help="submission file name; probabilities go to "
                                                 "<stem>_probs.csv next to it")
    add("--batch_size", type=int, default=256, help="inference batch size")
    add("--resize", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="override every model's training input size (warns when it differs)")
    add("--augmentation", default=None, choices=registry("augmentation", "AUGMENTATIONS"),
        help="override the augmentation (in eval mode it only normalizes)")
    add("--crop", default=None, choices=registry("image_cache", "CROPS"), help="override the training crop")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", default="checkpoint",
        choices=LazyChoices(lambda: ("checkpoint", *registry("mixed_precision", "AMP_MODES")),
                            "checkpoint or an --amp of train.py"),
        help="precision: checkpoint = what each model trained with (its best.pth records it); "
             "auto, bf16, fp16 or off as in train.py")
    add("--cache_dir", default=".cache", help="where decoded, cropped, resized images are kept")
    add("--ensemble", nargs="?", const=True, default=False, metavar="SELECTION_JSON",
        help="use every model given (all folds of a k-fold run); needed for more than one "
             "model. With a selection file of experiments.py select: its runs, weighted as "
             "selected, with its calibration (no --model_dir then)")
    add("--weights", type=float, nargs="+", default=None, metavar="W",
        help="with --ensemble: one positive weight per run of --model_dir, in order (a model "
             "dir's finished runs by name, as printed; a k-fold "
             "run's folds share its weight; default: every run 1)")
    add("--tta", default="none", type=tta_views, metavar="VIEWS",
        help="test-time views averaged as probabilities: none, or a comma list of "
             "registry views (flip: the mirror image; shift: 4 shifts by 1/16 of the size; "
             "scale: zoomed in and out by 10%%), e.g. flip or flip,scale")
    add("--answers", default=None, metavar="FILE",
        help="CSV ImageID,ans with the truth: print macro F1, accuracy, per-head F1, "
             "per-class precision/recall/F1/support, confusion")
    add("--calibrate", default=None, metavar="FILE",
        help=f"JSON with 18 per-class log-prob 'offsets' (when not given: the "
             f"{CALIBRATION} of a run folder, if there is one)")
    add("--no_calibrate", action="store_true", help=f"ignore any {CALIBRATION}")
    add("--fit_calibration", default=None, metavar="RUN_DIR",
        help=f"only fit offsets on RUN_DIR/oof.csv and write RUN_DIR/{CALIBRATION}")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Predict as ``args`` say; returns {'predictions', 'probs', 'output_csv', ...}."""
    from maskface import submission  # torch loads after the flags parse: --help is quick
    return submission.predict_eval(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
