"""Hyperparameter studies with Optuna over train.py's flags (tune.py is the command line).

A study is a folder ``{model_dir}/{name}``: every trial is an ordinary run folder inside it (so
experiments.py and inference.py read trials as they read any run), beside the study's storage,
trials.csv, best_config.json and the plots. What a study searches (the space, the train.py flags
it starts from, the pruner) lives in the storage with the trials, so any worker that can reach
the storage continues the study by its name alone.

The embedded storage is SQLite (``study.db`` in the study's folder), not Optuna's journal file:
Optuna's heartbeat, which turns the trial of a killed worker into a failed one, exists only for
its RDB storages, and a trial left RUNNING forever would hide that it never finished.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import fcntl
import gc
import importlib.util
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import optuna

from maskface import config, training
from maskface.cli import UserError
from maskface.files import atomic_write_bytes, atomic_write_text
from maskface.settings import resolve_settings

STORAGE_FILE = "study.db"
KINDS = ("float", "int", "categorical")
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step", "when"},
             "int": {"type", "low", "high", "log", "step", "when"},
             "categorical": {"type", "choices", "when"}}
# tune.py names, places and runs each trial itself: these flags are its, not the space's
NOT_TUNED = ("name", "model_dir", "resume", "config", "fold", "accept_data_change", "device")
ATTR = "maskface"  # the study's user attribute holding what it searches


@dataclass(frozen=True)
class Param:
    """One flag of the space. Categorical choices are kept as Optuna stores them: a list value
    (--resize 128 96) as the string '128 96'."""
    dest: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict = field(default_factory=dict)  # flag -> the choices of it this one is tuned with


# ----------------------------------------------------------------------------------------------
# The space file: every flag, type and range checked before anything trains
# ----------------------------------------------------------------------------------------------
def read_space_file(path: str | Path) -> dict:
    """The raw mapping of a .yaml/.yml/.json space file; UserError naming the file otherwise."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UserError(f"{path}: expected a search space in a .yaml, .yml or .json file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as why:
        raise UserError(f"{path}: not a readable text file ({type(why).__name__})") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as why:
            raise UserError(f"{path}: not valid JSON ({why})") from None
    else:
        import yaml
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as why:
            mark = getattr(why, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{where}: not valid YAML "
                            f"({getattr(why, 'problem', None) or why})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: expected a mapping of train.py flags to their ranges, e.g. "
                        "lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    return raw


def train_flags() -> dict[str, argparse.Action]:
    """train.py's flags by destination (old spellings mapped to theirs)."""
    actions = {a.dest: a for a in config.get_args_parser()._actions if a.option_strings}
    actions.pop("help", None)
    return actions


def flag_dest(name: object, where: str, actions: dict[str, argparse.Action]) -> str:
    """'lr', '--lr', 'max-lr' -> the destination of the train.py flag it names."""
    key = str(name).lstrip("-").replace("-", "_")
    key = config.ALIASES.get(f"--{key}", f"--{key}")[2:]
    if key not in actions:
        close = difflib.get_close_matches(key, list(actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{where}: '{name}' is not a flag of train.py{hint}")
    if key in NOT_TUNED:
        raise UserError(f"{where}: --{key} is set by tune.py for every trial, not searched")
    return key


def encoded(action: argparse.Action, value: Any, where: str) -> Any:
    """A choice as Optuna stores it (a list as 'a b'), checked against the flag like a value of
    a saved config.json is."""
    if isinstance(action.nargs, int) and isinstance(value, str):
        value = value.split()
    if isinstance(action.nargs, int) and isinstance(value, list) and action.type is not None:
        try:
            value = [action.type(v) for v in value]
        except (TypeError, ValueError):
            pass  # check_replayed names what was expected
    if action.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    value = config.whole_numbers(action, value)  # 64.0 -> 64 for an int flag, as a replay does
    config.check_replayed(action, value, where)
    if action.type not in (int, float, None) and isinstance(value, str):
        try:
            action.type(value)  # --augmentation: a preset name or the shape of a pipeline
        except (argparse.ArgumentTypeError, ValueError) as why:
            raise UserError(f"{where}: {why}") from None
    return " ".join(map(str, value)) if isinstance(value, list) else value


def decoded(action: argparse.Action, value: Any) -> Any:
    if isinstance(action.nargs, int) and isinstance(value, str):
        return [action.type(v) if action.type else v for v in value.split()]
    return value


def number(spec: dict, key: str, where: str, whole: bool) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not fits or (whole and float(value) != int(value)):
        raise UserError(f"{where}: {key} {json.dumps(value)}; expected "
                        + ("a whole number" if whole else "a number"))
    return int(value) if whole else float(value)


def parse_param(dest: str, spec: object, where: str, actions: dict,
                earlier: dict[str, Param]) -> Param:
    """One entry of the space, checked against train.py's flag ``dest``."""
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise UserError(f"{where}: expected {{type: float|int|categorical, ...}}, got "
                        f"{json.dumps(spec, default=str)}")
    kind, action = spec["type"], actions[dest]
    unknown = sorted(set(spec) - SPEC_KEYS[kind])
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} for a {kind}; expected "
                        + ", ".join(sorted(SPEC_KEYS[kind] - {'type'})))
    when = parse_condition(spec.get("when"), where, actions, earlier)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        coded = tuple(encoded(action, c, f"{where}: choice {json.dumps(c)}") for c in choices)
        if len(set(coded)) < len(coded):
            raise UserError(f"{where}: a choice is listed twice")
        return Param(dest, kind, choices=coded, when=when)
    wanted = {"float": float, "int": int}[kind]
    if action.type is not wanted or isinstance(action.nargs, int):
        shown = "an on/off switch" if action.nargs == 0 else \
            f"{action.nargs} values" if isinstance(action.nargs, int) else \
            {int: "an integer", float: "a number"}.get(action.type, "a string")
        fitting = {int: "int", float: "float"}.get(action.type, "categorical") \
            if not isinstance(action.nargs, int) else "categorical"
        raise UserError(f"{where}: --{dest} takes {shown}, not a {kind} range; use type: "
                        f"{fitting}")
    low, high = (number(spec, k, where, kind == "int") for k in ("low", "high"))
    step = number(spec, "step", where, kind == "int")
    log = spec.get("log", False)
    if low is None or high is None or not low < high:
        raise UserError(f"{where}: expected low < high, got low {spec.get('low')} high "
                        f"{spec.get('high')}")
    if not isinstance(log, bool) or (log and low <= 0) or (log and step is not None):
        raise UserError(f"{where}: log must be true or false; a log range needs low > 0 and "
                        "no step")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step {step}: expected a step above 0")
    for end in (low, high):
        fine, expected = config.LIMITS.get(dest, (lambda v: True, ""))
        if not fine(end):
            raise UserError(f"{where}: {end} is outside what --{dest} takes: {expected}")
    return Param(dest, kind, low=low, high=high, log=log, step=step, when=when)


def parse_condition(when: object, where: str, actions: dict,
                    earlier: dict[str, Param]) -> dict:
    """when: {scheduler: cycliclr} or {scheduler: [cycliclr, onecycle]}: a categorical flag
    listed earlier in the space, and some of its choices."""
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise UserError(f"{where}: when must map a flag to its value(s), e.g. "
                        "when: {scheduler: cycliclr}")
    parsed = {}
    for name, values in when.items():
        dest = flag_dest(name, f"{where}: when", actions)
        other = earlier.get(dest)
        if other is None or other.kind != "categorical":
            raise UserError(f"{where}: when {name}: expected a categorical flag listed above it "
                            "in the space")
        values = values if isinstance(values, list) else [values]
        coded = [encoded(actions[dest], v, f"{where}: when {name} {json.dumps(v)}")
                 for v in values]
        missing = [v for v in coded if v not in other.choices]
        if missing:
            raise UserError(f"{where}: when {name} {missing[0]}: not one of its choices "
                            f"{', '.join(map(str, other.choices))}")
        parsed[dest] = coded
    return parsed


def parse_space(raw: dict, source: str) -> list[Param]:
    actions, params = train_flags(), {}
    for name, spec in raw.items():
        dest = flag_dest(name, f"{source}: {name}", actions)
        if dest in params:
            raise UserError(f"{source}: {name}: --{dest} is listed twice")
        params[dest] = parse_param(dest, spec, f"{source}: {name}", actions, params)
    return list(params.values())


def space_record(params: list[Param]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()}
            for p in params]


def space_from_record(record: list[dict]) -> list[Param]:
    return [Param(**{**r, "choices": tuple(r["choices"])}) for r in record]


def resolved(args: argparse.Namespace):
    """train.py's settings for ``args``, checked as train.py checks them (quietly)."""
    return resolve_settings(args, say=lambda _: None)


def check_space_values(params: list[Param], base: argparse.Namespace, source: str) -> set:
    """Every choice and both ends of every range through train.py's own checks, on the study's
    other flags: a model name, pipeline file or input size it refuses fails now, not in trial 7.
    (Combinations of values are train.py's to refuse, trial by trial.) Returns the image
    preprocessings (cache variants) those values lead to."""
    actions, variants = train_flags(), {resolved(base).preprocess}
    for p in params:
        values = p.choices if p.kind == "categorical" else (p.low, p.high)
        for value in values:
            args = copy.copy(base)
            setattr(args, p.dest, decoded(actions[p.dest], value))
            try:
                variants.add(resolved(args).preprocess)
            except UserError as why:
                raise UserError(f"{source}: {p.dest} {value}: {why}") from None
    return variants


def suggest(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    """The trial's values (as Optuna stores them); a conditional flag only where its condition
    holds, so the study never records a value that the trial did not use."""
    chosen: dict[str, Any] = {}
    for p in params:
        if any(chosen.get(dest) not in values for dest, values in p.when.items()):
            continue
        if p.kind == "categorical":
            chosen[p.dest] = trial.suggest_categorical(p.dest, list(p.choices))
        elif p.kind == "int":
            chosen[p.dest] = trial.suggest_int(p.dest, int(p.low), int(p.high), log=p.log,
                                               step=int(p.step or 1))
        else:
            chosen[p.dest] = trial.suggest_float(p.dest, p.low, p.high, log=p.log, step=p.step)
    return chosen


def trial_args(base: argparse.Namespace, values: dict[str, Any]) -> argparse.Namespace:
    """The study's train.py flags with a trial's values put in."""
    actions = train_flags()
    args = copy.copy(base)
    for dest, value in values.items():
        setattr(args, dest, decoded(actions[dest], value))
    return args


# ----------------------------------------------------------------------------------------------
# The study's train.py flags
# ----------------------------------------------------------------------------------------------
def base_args(train_argv: list[str]) -> argparse.Namespace:
    """train.py's flags after '--' as train.py parses them (--config replayed); argparse's
    complaint becomes one line."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in train_argv
             if a.startswith("--")}
    refused = sorted(given & set(NOT_TUNED) - {"config", "device"})
    if refused:
        raise UserError(f"--{refused[0]} after '--': tune.py names and places each trial's run "
                        "folder itself (use tune.py --name and --model_dir)")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = config.parse_args(train_argv)
    except SystemExit:
        complaint = said.getvalue().strip().splitlines() or ["not train.py flags"]
        raise UserError(f"train.py flags after '--': {complaint[-1].split('error: ')[-1]}") \
            from None
    if not args.kfold and not args.folds and args.val_ratio == 0:
        raise UserError("--val_ratio 0 leaves no validation photo to score trials on; keep a "
                        "validation share or use --kfold")
    return args


# ----------------------------------------------------------------------------------------------
# Storage and the study
# ----------------------------------------------------------------------------------------------
def embedded_url(folder: Path) -> str:
    return f"sqlite:///{folder / STORAGE_FILE}"


def shown_url(url: str) -> str:
    """The storage URL without its password (it is printed and written to files)."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a URL at all: say it as given, it holds no password)
        return url


def with_driver(url: str) -> str:
    """postgresql://... as postgresql+psycopg2://...: SQLAlchemy 2.1 reads a bare postgresql://
    as psycopg 3, and requirements.txt installs psycopg2 (the URL is also what the dashboard
    command prints, so it works as printed)."""
    try:
        from sqlalchemy.engine import make_url
        parsed = make_url(url)
    except Exception:  # noqa: BLE001  (open_storage says what is wrong with it)
        return url
    if parsed.drivername != "postgresql" or importlib.util.find_spec("psycopg") is not None:
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` while the block runs: workers starting together on one
    embedded storage create its tables (and the shared image cache) one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def open_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with the heartbeat: a trial whose worker stops beating for twice
    ``heartbeat_s`` is failed (and retried once) by the next worker that asks for a trial."""
    sqlite = url.startswith("sqlite")
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 120}} if sqlite else None,
            heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=StaleTrial())
    except Exception as why:  # noqa: BLE001  (sqlalchemy's and the drivers' many kinds)
        first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        raise UserError(f"--storage {shown_url(url)}: cannot open it ({first})") from None


class StaleTrial:
    """A trial whose worker died (no heartbeat): its folder says so, and it is queued once more
    with the same values; the failed one is never a result."""

    def __init__(self) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_dir = Path(trial.user_attrs.get("run_dir", ""))
        if trial.user_attrs.get("run_dir") and run_dir.is_dir():
            atomic_write_text(run_dir / "failed.json", json.dumps(
                {"trial": trial.number, "study": study.study_name,
                 "reason": "its worker stopped (killed?): no heartbeat; not a result of the study"},
                indent=2))
        print(f"trial {trial.number}: its worker stopped sending heartbeats; marked failed"
              + (" and queued again" if trial.system_attrs.get("retry_history", []) == [] else ""),
              flush=True)
        self.retry(study, trial)


@dataclass
class Plan:
    """What a study searches: stored with it, so every worker and every later call agree."""
    space: list[Param]
    space_file: str
    train_argv: list[str]
    pruner: str
    pruner_startup: int
    pruner_warmup: int | None

    def record(self) -> dict:
        return {"space": space_record(self.space), "space_file": self.space_file,
                "train_argv": self.train_argv, "pruner": self.pruner,
                "pruner_startup": self.pruner_startup, "pruner_warmup": self.pruner_warmup}

    @classmethod
    def from_record(cls, record: dict) -> "Plan":
        return cls(**{**record, "space": space_from_record(record["space"])})


def stored_plan(name: str, storage: optuna.storages.RDBStorage) -> Plan | None:
    """The plan of the study ``name`` when the storage holds it."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    record = study.user_attrs.get(ATTR)
    return Plan.from_record(record) if record else None


def check_same_plan(kept: Plan, asked: dict, name: str, storage_shown: str) -> None:
    """A continued study keeps what it searches: anything given again must be what it was."""
    for key, value in asked.items():
        if key != "space_file" and value != kept.record()[key]:
            raise UserError(f"study {name} in {storage_shown} was started with another "
                            f"{key.replace('_', ' ')}; a study keeps what it searches: continue "
                            "it with just --name and --trials, or start a new --name")


def make_pruner(plan: Plan, kfold: int, folds: str | None,
                epochs: int) -> optuna.pruners.BasePruner:
    """Steps are epochs, or folds for a k-fold study (pruned only between folds)."""
    if plan.pruner == "none":
        return optuna.pruners.NopPruner()
    if plan.pruner == "hyperband":
        # a --folds file's number of folds is known once a trial has run: 'auto' reads it
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=kfold or ("auto" if folds else epochs),
            reduction_factor=3)
    warmup = plan.pruner_warmup if plan.pruner_warmup is not None else (
        1 if kfold or folds else 2)
    return optuna.pruners.MedianPruner(n_startup_trials=plan.pruner_startup,
                                       n_warmup_steps=warmup)


# ----------------------------------------------------------------------------------------------
# Trials: ordinary train.py runs, their epochs (or folds) reported to the pruner
# ----------------------------------------------------------------------------------------------
class Reporter:
    """train.main's progress observer for one trial: each epoch's val F1 (a k-fold trial: the
    mean of its folds' best F1 after each fold) goes to Optuna, which may prune the trial there.
    A pruned trial's folder gets pruned.json, saying so."""

    def __init__(self, trial: optuna.Trial, kfold: bool) -> None:
        self.trial, self.kfold, self.fold_bests = trial, kfold, []
        self.run_dir: Path | None = None

    def __call__(self, event: dict) -> None:
        if self.run_dir is None:
            # a k-fold run's epochs are written in its fold{k} folders; the trial is the run
            folder = Path(event["run_dir"])
            inside_fold = event["event"] == "epoch" and event.get("fold") is not None
            self.run_dir = folder.parent if inside_fold else folder
            self.trial.set_user_attr("run_dir", str(self.run_dir))
        if self.kfold and event["event"] == "fold":
            self.fold_bests.append(event["best_f1"])
            step, value, unit = len(self.fold_bests), sum(self.fold_bests) / len(
                self.fold_bests), "fold"
        elif not self.kfold and event["event"] == "epoch":
            step, value, unit = event["epoch"], event["val_f1"], "epoch"
        else:
            return
        if not math.isfinite(value):
            return  # nothing to judge the trial on (NaN: a degenerate validation split)
        self.trial.report(value, step)
        if self.trial.should_prune():
            atomic_write_text(self.run_dir / "pruned.json", json.dumps(
                {"trial": self.trial.number, "study": self.trial.study.study_name,
                 "pruned_after": f"{unit} {step}", "value": value,
                 "why": "below the pruner's bar for that step; checkpoints kept (train.py "
                        "--resume finishes it)"}, indent=2))
            raise optuna.TrialPruned(f"{unit} {step}: val F1 {value:.4f}")


def run_trial(trial: optuna.Trial, plan: Plan, base: argparse.Namespace, folder: Path,
              device: str | None) -> float:
    """One trial: train.py's main on the study's flags with the trial's values; returns its
    best val macro F1 (out-of-fold macro F1 for k-fold). A combination train.py refuses, or one
    that runs out of memory, fails the trial (NaN) and the study goes on."""
    values = suggest(trial, plan.space)
    args = trial_args(base, values)
    args.name, args.model_dir = f"{folder.name}-t{trial.number:03d}", str(folder)
    if device:
        args.device = device
    trial.set_user_attr("run_dir", str(folder / args.name))  # where it will be, until it is
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    print(f"trial {trial.number}: {shown}", flush=True)
    reporter = Reporter(trial, bool(args.kfold or args.folds))
    try:
        result = training.train(args, progress=reporter)
    except UserError as why:
        trial.set_user_attr("refused", str(why))
        print(f"trial {trial.number}: failed, train.py refused it: {why}", flush=True)
        return float("nan")
    except optuna.TrialPruned as why:
        print(f"trial {trial.number}: pruned after {why}", flush=True)
        raise
    except RuntimeError as why:  # torch's out of memory (a batch size too big for the GPU)
        if "out of memory" not in str(why):
            raise
        trial.set_user_attr("refused", "out of memory")
        print(f"trial {trial.number}: failed, out of memory", flush=True)
        return float("nan")
    finally:
        release_memory()
    trial.set_user_attr("run_dir", str(result["run_dir"]))
    print(f"trial {trial.number}: val F1 {result['best_f1']:.4f} -> {result['run_dir']}",
          flush=True)
    return float(result["best_f1"])


def release_memory() -> None:
    """The trial's tensors gone before the next trial allocates its own (a GPU worker runs many
    trials in one process)."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_cache(base: argparse.Namespace, lock: Path, variants: set) -> None:
    """Decode the study's photos into the image cache once, before the first trial, one worker
    at a time (the others then find it built); also where a wrong --data_dir fails, in one line,
    before anything trains. A space over preprocessing flags (--resize, --crop, a preset's crop)
    builds each of its variants in the first trial that needs it instead."""
    settings = resolved(base)
    with locked(lock):
        _, frame = training.load_records(settings)
        if len(variants) == 1:
            training.build_image_cache(settings, frame)


# ----------------------------------------------------------------------------------------------
# What a study leaves in its folder
# ----------------------------------------------------------------------------------------------
def best_config(plan: Plan, values: dict, folder: Path) -> dict:
    """train.py's settings of the trial with ``values``, as a config.json for --config (its
    replay makes a new run {study}-best beside the study's folder)."""
    args = trial_args(base_args(plan.train_argv), values)
    args.name, args.model_dir = f"{folder.name}-best", str(folder.parent)
    return {k: v for k, v in vars(args).items() if k not in config.NOT_SAVED}


PLOTS = (("history.png", "plot_optimization_history"),
         ("param_importances.png", "plot_param_importances"),
         ("parallel_coordinates.png", "plot_parallel_coordinate"))


def write_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optuna's matplotlib pictures of the study as PNGs; one that cannot be drawn yet (param
    importances need two finished trials that differ) is said and skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as pictures
    made = []
    for file, name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these plots experimental
                drawn = getattr(pictures, name)(study)
        except Exception as why:  # noqa: BLE001  (a picture is a convenience; the study is not)
            print(f"{file}: not drawn yet ({str(why).splitlines()[0] if str(why) else why!r})")
            continue
        figure = drawn.figure if hasattr(drawn, "figure") else drawn.flat[0].figure
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        atomic_write_bytes(folder / file, png.getvalue())
        made.append(file)
    return made


def write_reports(study: optuna.Study, plan: Plan, folder: Path, url: str) -> dict:
    """trials.csv, best_config.json and the plots, from every worker's trials; returns the
    counts by state and the best trial (None before the first finished one)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in optuna.trial.TrialState}
    folder.mkdir(parents=True, exist_ok=True)
    if trials:
        table = study.trials_dataframe()
        atomic_write_text(folder / "trials.csv", table.to_csv(index=False))
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(finished, key=lambda t: t.value) if finished else None
    if best is not None:
        atomic_write_text(folder / "best_config.json",
                          json.dumps(best_config(plan, best.params, folder), indent=2))
    made = write_plots(study, folder) if finished else []
    written = ([f"{folder}/trials.csv"] if trials else []) + made
    print(f"study {study.study_name}: {counts['complete']} finished, {counts['pruned']} pruned, "
          f"{counts['fail']} failed, {counts['running']} running ({len(trials)} trials)"
          + (f" -> {', '.join(written)}" if written else ""))
    if best is not None:
        print(f"best: trial {best.number}, val F1 {best.value:.4f} "
              f"({', '.join(f'{k} {v}' for k, v in best.params.items())}) -> "
              f"{best.user_attrs.get('run_dir')}")
        print(f"replay it: python train.py --config {folder / 'best_config.json'}")
    print(f"dashboard: optuna-dashboard {url}")
    return {"counts": counts, "best": best}


# ----------------------------------------------------------------------------------------------
# A worker: open (or start) the study, run its trials, write what the study has
# ----------------------------------------------------------------------------------------------
def asked_plan(args: argparse.Namespace, train_argv: list[str]) -> dict:
    """The parts of a plan this call gives (every one checked before anything trains)."""
    asked: dict[str, Any] = {}
    if args.space:
        asked["space"] = space_record(parse_space(read_space_file(args.space), args.space))
        asked["space_file"] = str(args.space)
    if train_argv:
        base_args(train_argv)
        asked["train_argv"] = list(train_argv)
    for key in ("pruner", "pruner_startup", "pruner_warmup"):
        if getattr(args, key) is not None:
            asked[key] = getattr(args, key)
    return asked


def check_worker_flags(args: argparse.Namespace) -> Path:
    if args.name in ("", ".", "..") or Path(args.name).name != args.name:
        raise UserError(f"--name '{args.name}': expected a plain folder name (no '/'); use "
                        "--model_dir for where the study's folder goes")
    for flag, low in (("trials", 0), ("heartbeat", 1), ("random_trials", 0),
                      ("pruner_startup", 0), ("pruner_warmup", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UserError(f"--{flag} {value}: expected {low} or more")
    if args.seed is not None and not 0 <= args.seed < 2 ** 31:
        raise UserError(f"--seed {args.seed}: expected 0 <= seed < 2**31")
    if args.device:
        from maskface.distributed import resolve_device
        resolve_device(args.device)
    return Path(args.model_dir) / args.name


def run_study(args: argparse.Namespace, train_argv: list[str]) -> dict:
    """tune.py: run ``args.trials`` trials of the study ``args.name`` in this process (a new
    study needs --space), then write the study's reports. Returns write_reports' result."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial says itself, in one line
    # the heartbeat and its retry are marked experimental (since Optuna 2.x); said once in docs
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    folder = check_worker_flags(args)
    asked = asked_plan(args, train_argv)
    url = with_driver(args.storage) if args.storage else embedded_url(folder)
    shown = shown_url(url)
    if not args.storage and not (folder / STORAGE_FILE).is_file() and "space" not in asked:
        raise UserError(f"no study {args.name} in {folder} (no {STORAGE_FILE}); start one with "
                        "--space FILE")
    if "space" in asked:  # checked in full before the storage (or a folder) is touched
        check_space_values(space_from_record(asked["space"]),
                           base_args(asked.get("train_argv", [])), asked["space_file"])
    lock = folder / ".tune.lock"
    with locked(lock):  # workers starting together: one creates the study, the others load it
        storage = open_storage(url, args.heartbeat)
        plan = stored_plan(args.name, storage)
        if plan is not None:
            check_same_plan(plan, asked, args.name, shown)
        else:
            if "space" not in asked:
                raise UserError(f"no study {args.name} in {shown}; start one with --space FILE")
            plan = Plan.from_record({"train_argv": [], "pruner": "median", "pruner_startup": 4,
                                     "pruner_warmup": None, **asked})
        base = base_args(plan.train_argv)
        variants = check_space_values(plan.space, base, plan.space_file)
        if not stored_plan(args.name, storage):
            created = optuna.create_study(study_name=args.name, storage=storage,
                                          direction="maximize", load_if_exists=True)
            created.set_user_attr(ATTR, plan.record())
    warm_cache(base, lock, variants)
    done_before = len(optuna.load_study(study_name=args.name, storage=storage).trials)
    # a fixed --seed replays the same proposals; offset by the trials already run, so that a
    # continued study does not propose its first trials again
    sampler = optuna.samplers.TPESampler(
        seed=None if args.seed is None else args.seed + done_before,
        n_startup_trials=args.random_trials, constant_liar=True)
    study = optuna.load_study(study_name=args.name, storage=storage, sampler=sampler,
                              pruner=make_pruner(plan, base.kfold, base.folds, base.epochs))
    optuna.storages.fail_stale_trials(study)  # also with --trials 0: a dead worker's trial
    print(f"study {args.name}: {done_before} trials so far in {shown}; running {args.trials} "
          f"more here (pruner {plan.pruner})", flush=True)
    try:
        if args.trials:
            study.optimize(lambda trial: run_trial(trial, plan, base, folder, args.device),
                           n_trials=args.trials)
    finally:
        report = write_reports(study, plan, folder, url if not args.storage else shown)
    return report
