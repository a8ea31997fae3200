"""tune.py: the space file checked before anything trains, studies that prune and continue, a
killed worker's trial failed by the heartbeat and never counted, workers sharing one study (the
embedded SQLite file, and a real PostgreSQL server), and the dashboard serving a study."""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

import experiments
import tune
from maskface import config, tuning
from maskface.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
lr: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}
scheduler: {type: categorical, choices: [steplr, cycliclr]}
maxlr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true, when: {scheduler: cycliclr}}
multi_head: {type: categorical, choices: [true, false]}
"""


@pytest.fixture()
def study_flags(tiny_train_dir, tmp_path):
    """study_flags(name, *tune_flags, train=[...]): tune.py's argv for a study of tiny CPU trials
    (32x24, 2 epochs) on the tiny sample, its folder under tmp_path/model."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)

    def flags(name: str, *tune_flags: str, train: tuple = ()) -> list[str]:
        return ["--name", name, "--model_dir", str(tmp_path / "model"), *tune_flags, "--",
                "--data_dir", str(tiny_train_dir), "--cache_dir", str(tmp_path.parent / "tune-cache"),
                "--resize", "32", "24", "--batch_size", "32", "--valid_batch_size", "64",
                "--epochs", "2", "--device", "cpu", *train]
    flags.space = space
    return flags


def load(tmp_path: Path, name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name,
                             storage=storage or f"sqlite:///{tmp_path / 'model' / name / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------- the space file
BAD_SPACES = [
    ("lrr: {type: float, low: 0.001, high: 0.1}\n", "'lrr' is not a flag of train.py (did you mean lr?)"),
    ("model: {type: float, low: 1, high: 2}\n", "--model takes a string, not a float range; use "
     "type: categorical"),
    ("tmax: {type: float, low: 1, high: 9}\n", "--tmax takes an integer, not a float range; use "
     "type: int"),
    ("momentum: {type: float, low: 0.5, high: 1.5}\n", "1.5 is outside what --momentum takes"),
    ("lr: {type: float, low: 0, high: 0.1, log: true}\n", "a log range needs low > 0"),
    ("lr: {type: float, low: 0.1, high: 0.01}\n", "expected low < high"),
    ("criterion: {type: categorical, choices: [focal, focall]}\n", "setting 'criterion' is \"focall\""),
    ("model: {type: categorical, choices: [resnet18, resnet1888]}\n", "model resnet1888: --model"),
    ("maxlr: {type: float, low: 0.01, high: 0.1, when: {scheduler: cycliclr}}\n",
     "when scheduler: expected a categorical flag listed above it"),
    ("scheduler: {type: categorical, choices: [steplr]}\n"
     "maxlr: {type: float, low: 0.01, high: 0.1, when: {scheduler: cycliclr}}\n",
     "when scheduler cycliclr: not one of its choices"),
    ("lr: {type: float, low: 0.001, hihg: 0.1}\n", "unknown key(s) hihg"),
    ("name: {type: categorical, choices: [a, b]}\n", "--name is set by tune.py"),
    ("lr: {type: float, low: 0.001, high: 0.1\n", "space.yaml:2: not valid YAML"),
    ("- lr\n", "expected a mapping of train.py flags"),
]


@pytest.mark.parametrize("text, says", BAD_SPACES)
def test_a_bad_space_file_is_one_line_and_nothing_is_written(study_flags, tmp_path, capsys,
                                                             text, says):
    study_flags.space.write_text(text)
    code = run_cli(tune.main, tune.parse_args, study_flags("bad", "--space", str(study_flags.space)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert err.startswith(f"error: {study_flags.space}")
    assert not (tmp_path / "model").exists()


def test_bad_flags_on_the_command_line_are_one_line_without_traceback(study_flags, tmp_path):
    json_space = tmp_path / "space.json"
    json_space.write_text('{"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": true}}')
    result = subprocess.run(
        [sys.executable, "tune.py", *study_flags("s", "--space", str(json_space),
                                                 train=("--lrr", "3"))],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: train.py flags after '--': unknown flag --lrr; nearest: --lr, --maxlr, --min_lr", result.stderr
    for argv, says in [
        (study_flags("s", "--space", str(json_space), train=("--name", "x")), "--name after '--'"),
        (study_flags("s", "--space", str(tmp_path / "none.yaml")), "none.yaml: file not found"),
        (study_flags("s", "--space", str(json_space), "--storage", "nosuchdb://x"),
         "--storage nosuchdb://x: cannot open it"),
        (study_flags("s", "--trials", "1"), "no study s in"),
        (study_flags("s", "--space", str(json_space), "--trials", "-1"), "--trials -1: expected 0"),
        (study_flags("s", "--space", str(json_space), "--device", "cuda:99"), "--device cuda:99"),
    ]:
        with pytest.raises(tuning.UserError, match=re.escape(says)):
            tune.main(tune.parse_args(argv))
    assert not (tmp_path / "model" / "s" / "study.db").exists()


def test_conditions_and_list_values_reach_the_trial_as_train_py_flags(study_flags):
    space = tuning.parse_space(tuning.read_space_file(study_flags.space), "space.yaml")
    space += tuning.parse_space({"resize": {"type": "categorical",
                                            "choices": [[32, 24], [64, 48]]}}, "inline")
    base = config.parse_args([])
    steady = tuning.suggest(optuna.trial.FixedTrial(
        {"lr": 0.01, "scheduler": "steplr", "multi_head": True, "resize": "64 48"}), space)
    assert "maxlr" not in steady  # only drawn with cycliclr: never recorded for another one
    args = tuning.trial_args(base, steady)
    assert (args.lr, args.scheduler, args.multi_head, args.resize, args.maxlr) == \
        (0.01, "steplr", True, [64, 48], None)
    cyclic = tuning.suggest(optuna.trial.FixedTrial(
        {"lr": 0.01, "scheduler": "cycliclr", "maxlr": 0.05, "multi_head": False,
         "resize": "32 24"}), space)
    assert tuning.trial_args(base, cyclic).maxlr == 0.05
    sizes = tuning.parse_space({"batch_size": {"type": "categorical", "choices": [32.0, 64]}}, "x")
    assert sizes[0].choices == (32, 64)  # an int flag gets ints, as a config.json replay does


def test_a_k_fold_trial_is_judged_after_each_fold(tmp_path):
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1,
                                                                   n_warmup_steps=1))
    leader = study.ask()
    leader.report(0.8, 1)
    study.tell(leader, 0.8)
    trial = study.ask()
    reporter = tuning.Reporter(trial, kfold=True)
    reporter({"event": "epoch", "run_dir": tmp_path / "fold0", "fold": 0, "epoch": 1,
              "val_f1": 0.1, "best_f1": 0.1})
    assert study.trials[1].intermediate_values == {}  # a fold's epochs are not judged
    with pytest.raises(optuna.TrialPruned, match="fold 1"):
        reporter({"event": "fold", "run_dir": tmp_path, "fold": 0, "best_f1": 0.3})
    assert study.trials[1].intermediate_values == {1: 0.3}
    assert study.trials[1].user_attrs["run_dir"] == str(tmp_path)  # the run, not its fold0
    pruned = json.loads((tmp_path / "pruned.json").read_text())
    assert pruned["pruned_after"] == "fold 1" and pruned["value"] == 0.3


# ---------------------------------------------------------------------------- whole studies
@pytest.mark.slow
def test_a_study_prunes_reports_and_continues_later(study_flags, tmp_path, capsys):
    argv = study_flags("lr", "--space", str(study_flags.space), "--trials", "4", "--seed", "3",
                       "--pruner_startup", "1", "--pruner_warmup", "1", "--random_trials", "4")
    assert run_cli(tune.main, tune.parse_args, argv) == 0
    study, folder = load(tmp_path, "lr"), tmp_path / "model" / "lr"
    assert len(study.trials) == 4 and "PRUNED" in states(study) and "COMPLETE" in states(study)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    for trial in pruned:  # the folder says so, with the step the pruner stopped it at
        mark = json.loads((Path(trial.user_attrs["run_dir"]) / "pruned.json").read_text())
        assert mark["trial"] == trial.number and mark["pruned_after"].startswith("epoch ")
    table = experiments.table_main(experiments.parse_args(["table", str(folder)]))
    assert sorted(table["run"]) == [f"lr-t{n:03d}" for n in range(4)]
    # from the model dir, as any runs: the study's folder stands for its trials
    listed = experiments.table_main(experiments.parse_args(
        ["table", str(tmp_path / "model"), "--filter", "lr*"]))
    assert sorted(listed["run"]) == sorted(table["run"])
    assert (table["status"].str.startswith("pruned by tune.py")).sum() == len(pruned)
    # the best trial's flags replay as a config.json
    best = study.best_trial
    replay = config.parse_args(["--config", str(folder / "best_config.json")])
    assert replay.lr == best.params["lr"] and replay.multi_head == best.params["multi_head"]
    assert (replay.epochs, replay.resize, replay.name) == (2, [32, 24], "lr-best")
    csv_rows = (folder / "trials.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 5 and "PRUNED" in (folder / "trials.csv").read_text()
    for png in ("history.png", "param_importances.png", "parallel_coordinates.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    out = capsys.readouterr().out
    assert f"optuna-dashboard sqlite:///{folder / 'study.db'}" in out

    # later: the same study by its name alone, one more trial, a new proposal
    assert run_cli(tune.main, tune.parse_args, ["--name", "lr", "--model_dir", str(tmp_path / "model"),
                                                "--trials", "1", "--seed", "3"]) == 0
    study = load(tmp_path, "lr")
    assert len(study.trials) == 5
    first = [t.params for t in study.trials[:4]]
    assert study.trials[4].params not in first
    assert len(list(folder.glob("lr-t*"))) == 5

    # the same --seed on a new study proposes what the first one did
    again = study_flags("lr-again", "--space", str(study_flags.space), "--trials", "1",
                        "--seed", "3", "--random_trials", "4")
    assert run_cli(tune.main, tune.parse_args, again) == 0
    assert [t.params for t in load(tmp_path, "lr-again").trials] == first[:1]


def start_tune(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tune.py", *argv], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trial_failed_and_uncounted(study_flags, tmp_path, capsys):
    argv = study_flags("kill", "--space", str(study_flags.space), "--trials", "1",
                       "--heartbeat", "1", "--seed", "5", train=("--epochs", "3"))
    victim = start_tune(argv, tmp_path / "victim.log")
    first_epoch = tmp_path / "model" / "kill" / "kill-t000" / "summary.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not first_epoch.is_file() and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert first_epoch.is_file(), (tmp_path / "victim.log").read_text()[-2000:]
    assert states(load(tmp_path, "kill")) == ["RUNNING"]
    # past the grace period (2 heartbeats) of the dead worker's trial; SQLite's CURRENT_TIMESTAMP,
    # which Optuna stamps heartbeats and 'now' with, has whole seconds: one more to be sure
    time.sleep(4.0)
    assert run_cli(tune.main, tune.parse_args,
                   ["--name", "kill", "--model_dir", str(tmp_path / "model"), "--trials", "1",
                    "--heartbeat", "1"]) == 0
    study = load(tmp_path, "kill")
    assert states(study) == ["FAIL", "COMPLETE"]
    killed, retried = study.trials
    assert retried.params == killed.params and study.best_trial.number == 1
    assert (tmp_path / "model" / "kill" / "kill-t000" / "failed.json").is_file()
    table = experiments.table_main(experiments.parse_args(["table", str(tmp_path / "model" / "kill")]))
    assert table.set_index("run").loc["kill-t000", "status"].startswith("failed: its tune.py")
    assert "1 finished, 0 pruned, 1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_two_worker_processes_share_one_embedded_study(study_flags, tmp_path):
    argv = study_flags("pair", "--space", str(study_flags.space), "--trials", "1",
                       "--pruner", "hyperband")
    workers = [start_tune(argv, tmp_path / f"worker{i}.log") for i in range(2)]
    codes = [w.wait(timeout=300) for w in workers]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    study = load(tmp_path, "pair")
    assert sorted(t.number for t in study.trials) == [0, 1]  # one each, numbered by the study
    assert set(states(study)) <= {"COMPLETE", "PRUNED"}
    # the one that finished last wrote the study's reports from both workers' trials
    assert sum("(2 trials)" in log for log in logs) >= 1
    assert sorted(p.name for p in (tmp_path / "model" / "pair").glob("pair-t*")) == \
        ["pair-t000", "pair-t001"]


# ---------------------------------------------------------------------------- PostgreSQL
def postgres_binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        pytest.fail("no PostgreSQL server here (/usr/lib/postgresql/*/bin/pg_ctl): install "
                    "Debian's postgresql package (.ci/run does)")
    return found[-1].parent


@pytest.fixture()
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder on a free port (as the postgres
    user when this runs as root: initdb refuses root), stopped after the test."""
    bin_dir = postgres_binaries()
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data, log = free_port(), folder / "data", folder / "server.log"

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
    made = run(str(bin_dir / "initdb"), "-D", str(data), "-U", "tuner", "--auth=trust")
    if made.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"initdb failed: {made.stderr.strip()[-500:]}")
    started = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                  "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        if started.returncode:
            why = log.read_text()[-800:] if log.is_file() else started.stderr
            pytest.fail(f"the PostgreSQL server did not start: {why.strip()}")
        yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_study_on_a_real_postgresql_server(study_flags, tmp_path,
                                                              postgres_url):
    argv = study_flags("pg", "--space", str(study_flags.space), "--trials", "1",
                       "--storage", postgres_url, train=("--kfold", "2", "--epochs", "1"))
    workers = [start_tune(argv, tmp_path / f"pg{i}.log") for i in range(2)]
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"pg{i}.log").read_text()[-2000:] for i in range(2)]
    study = load(tmp_path, "pg", storage=tuning.with_driver(postgres_url))  # as tune.py reads it
    assert sorted(t.number for t in study.trials) == [0, 1]
    for trial in study.trials:  # k-fold trials: the objective is the run's out-of-fold F1
        if trial.state.name == "COMPLETE":
            oof = json.loads((Path(trial.user_attrs["run_dir"]) / "oof_metrics.json").read_text())
            assert trial.value == pytest.approx(oof["f1"])
    assert "optuna-dashboard postgresql+psycopg2://tuner@127.0.0.1" in \
        (tmp_path / "pg0.log").read_text()
    # k-fold trials are runs like any: experiments.py selects their out-of-fold ensemble
    chosen = experiments.select_main(experiments.parse_args(
        ["select", str(tmp_path / "model" / "pg"), "--split_repeats", "0"]))
    assert json.loads(chosen["output"].read_text())
    assert chosen["output"] == tmp_path / "model" / "pg" / "selection.json"


# ---------------------------------------------------------------------------- the dashboard
def test_optuna_dashboard_serves_the_study_over_http(study_flags, tmp_path):
    assert run_cli(tune.main, tune.parse_args,
                   study_flags("shown", "--space", str(study_flags.space), "--trials", "0")) == 0
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), "--host", "127.0.0.1",
         "--port", str(port), f"sqlite:///{tmp_path / 'model' / 'shown' / 'study.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        answer, deadline = None, time.time() + 60
        while answer is None and time.time() < deadline and dashboard.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as reply:
                    answer = json.loads(reply.read())
            except OSError:
                time.sleep(0.2)
        assert answer is not None, f"no answer from optuna-dashboard: {dashboard.stderr}"
        assert [s["study_name"] for s in answer["study_summaries"]] == ["shown"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
