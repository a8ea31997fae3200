"""Search train.py's flags with Optuna: every trial an ordinary run folder inside the study's.

    python tune.py --space space.yaml --trials 40 --name lr-aug -- --model resnet18 --epochs 12
    python tune.py --name lr-aug --trials 20                       # continue the study later
    python tune.py --name lr-aug --trials 10 --device cuda:1       # one more worker, another GPU
    python tune.py --name lr-aug --storage postgresql://user@host/db   # workers on many machines
    python experiments.py table model/lr-aug                       # the trials, as any runs

Flags after '--' are train.py's, the same for every trial; the space file (YAML or JSON) says
which flags each trial draws. See docs/tuning.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from maskface.cli import FlagParser, run_cli

PRUNERS = ("median", "hyperband", "none")  # maskface.tuning.make_pruner's


def get_args_parser() -> FlagParser:
    p = FlagParser(description=__doc__.split("\n\n")[0] + " Every flag is also accepted with "
                   "hyphens.", epilog="train.py's flags go after '--'.")
    p.add_argument("--name", required=True, help="the study: its folder is --model_dir/NAME")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="search space (.yaml/.yml/.json); needed to start a study, and when "
                        "given again it must be the study's")
    p.add_argument("--trials", type=int, default=10,
                   help="trials this process runs (0: just rewrite the study's reports)")
    p.add_argument("--model_dir", default=os.environ.get("SM_MODEL_DIR", "./model"),
                   help="where the study's folder goes (as train.py's --model_dir)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="an Optuna RDB URL (postgresql://, mysql://) shared by workers on many "
                        "machines (when not given: sqlite study.db in the study's folder)")
    p.add_argument("--pruner", default=None, choices=PRUNERS,
                   help="stops trials that trail the others: median (the median of earlier "
                        "trials at the same epoch), hyperband, or none (when not given: the "
                        "study's, median for a new one)")
    p.add_argument("--pruner_startup", type=int, default=None, metavar="N",
                   help="median: trials that finish before any is pruned (when not given: the "
                        "study's, 4 for a new one)")
    p.add_argument("--pruner_warmup", type=int, default=None, metavar="STEPS",
                   help="median: the earliest epoch a trial may be pruned at, or fold for k-fold "
                        "(when not given: epoch 2, fold 1)")
    p.add_argument("--random_trials", type=int, default=10, metavar="N",
                   help="trials drawn at random before TPE models the results")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the sampler: the same study replays the same proposals (when not "
                        "given: random); give each of several workers its own")
    p.add_argument("--device", default=None,
                   help="train.py's --device for this worker's trials, e.g. cuda:1 (one worker "
                        "per GPU)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="a running trial's worker beats this often; a trial silent for twice "
                        "as long (its worker killed) is failed and queued once more")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(tune.py's flags, train.py's flags after '--')."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return get_args_parser().parse_args(argv[:cut]), argv[cut + 1:]


def main(parsed: tuple[argparse.Namespace, list[str]]) -> dict:
    from maskface import tuning  # after the flags parse: --help answers without torch
    args, train_argv = parsed
    return tuning.run_study(args, train_argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
