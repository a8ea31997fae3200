"""experiments.py: the run table (hidden run folders listed) and the out-of-fold ensemble
selection, its file, and what inference.py --ensemble FILE and ensemble_csv.py --soft
--weights_file make of it."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_selection import noisy_probs, people, write_oof_run  # synthetic OOF runs

import ensemble_csv
import experiments
import inference
import train
from maskface import config, labels as classes, selection
from maskface.cli import run_cli
from maskface.labels import PROB_COLUMNS


def select_cli(capsys, *argv) -> tuple[int, str]:
    code = run_cli(experiments.main, experiments.parse_args, ["select", *map(str, argv)])
    return code, capsys.readouterr().err


def test_selection_picks_the_obviously_better_run_of_a_pair(tmp_path, capsys):
    photos = people(60)
    labels = photos["label"].to_numpy()
    # confidently wrong: any share of it in the mix costs F1 (listed first, so order cannot win)
    write_oof_run(tmp_path / "model" / "a-wrong", photos,
                  noisy_probs((labels + 1) % 18, 3.0, 18, 1))
    write_oof_run(tmp_path / "model" / "good", photos, noisy_probs(labels, 2.5, 18, 2))
    result = experiments.main(experiments.parse_args(
        ["select", str(tmp_path / "model"), "--split_repeats", "1"]))
    assert result["best_single"]["runs"] == ["good"]
    assert [m["runs"] for m in result["members"]] == [["good"]]
    document = json.loads((tmp_path / "model" / "selection.json").read_text())
    assert document["members"][0]["weight"] == 1.0 and set(document["runs"]) == {"good"}
    assert document["runs"]["good"]["path"] == "good"  # relative to the file: move them together
    out = capsys.readouterr().out
    assert "step  1: + good" in out and "split-half check" in out


def test_a_second_run_that_fixes_the_first_ones_blind_spot_is_added(tmp_path, capsys):
    photos = people(60)
    labels = photos["label"].to_numpy()
    # run a is good on gender 0 only, run b on gender 1 only: the mix beats both
    gender = classes.decode_class(labels)[1]
    a = np.where((gender == 0)[:, None], noisy_probs(labels, 3, 18, 1), noisy_probs(labels, 0, 18, 2))
    b = np.where((gender == 1)[:, None], noisy_probs(labels, 3, 18, 3), noisy_probs(labels, 0, 18, 4))
    runs = [selection.read_oof_run(write_oof_run(tmp_path / n, photos, p), n)
            for n, p in (("a", a), ("b", b))]
    result = selection.select_runs(runs, repeats=2)
    assert sorted(m["runs"][0] for m in result["members"]) == ["a", "b"]
    assert result["oof_f1"] > result["best_single"]["oof_f1"] + 0.1
    check = result["split_half"]
    assert check["mix"]["mean"] > 0.05  # real: it holds on unseen people
    assert check["mix"]["positive"] == check["halves"] == 4
    assert "verdict: the mix's gain over the best single run holds" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad input
def test_runs_on_different_folds_are_refused_naming_them(tmp_path, capsys):
    photos = people(30)
    labels = photos["label"].to_numpy()
    write_oof_run(tmp_path / "a", photos, noisy_probs(labels, 1, 18, 1))
    other = photos.groupby("profile")["fold"].first().map(lambda f: (f + 1) % 3)
    write_oof_run(tmp_path / "b", photos.assign(fold=photos["profile"].map(other)),
                  noisy_probs(labels, 1, 18, 2), folds=other)
    code, err = select_cli(capsys, tmp_path / "a", tmp_path / "b", "-o", tmp_path / "s.json")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "different folds" in err and " a (folds" in err and " b (folds" in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("case, message", [
    ("no_oof", "no oof.csv"),
    ("empty_model_dir", "no run folders in"),
    ("only_single_runs", "no finished k-fold runs"),
    ("incomplete_trio", "make no mask+gender+age trio (no age run)"),
    ("other_labels", "labels differ"),
    ("logits", "not a number in [0, 1]"),
])
def test_bad_selection_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    photos = people(12)
    labels = photos["label"].to_numpy()
    model = tmp_path / "model"
    model.mkdir()
    good = write_oof_run(model / "good", photos, noisy_probs(labels, 1, 18, 1))
    argv = [model]
    if case == "no_oof":
        (model / "half").mkdir()
        (model / "half" / "config.json").write_text("{}")
        argv = [good, model / "half"]
    elif case == "empty_model_dir":
        shutil.rmtree(good)
    elif case == "only_single_runs":
        (good / "oof.csv").unlink()
    elif case == "incomplete_trio":
        for category in ("mask", "gender"):
            target = classes.category_target(labels, category)
            write_oof_run(model / category, photos,
                          noisy_probs(target, 1, classes.CATEGORY_CLASSES[category], 3), category)
    elif case == "other_labels":
        write_oof_run(model / "relabelled", photos.assign(label=(labels + 1) % 18),
                      noisy_probs(labels, 1, 18, 4))
    elif case == "logits":
        write_oof_run(model / "logits", photos, np.log(noisy_probs(labels, 1, 18, 5)))
    code, err = select_cli(capsys, *argv, "-o", tmp_path / "s.json")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("weights", [[0, 0], [-1, 2], ["1", 1]])
def test_selection_weights_that_do_not_sum_positive_are_refused(tmp_path, capsys, weights):
    document = {"format": "maskface-selection/1", "runs": {"a": {"path": "a"}, "b": {"path": "b"}},
                "members": [{"runs": ["a"], "weight": weights[0]},
                            {"runs": ["b"], "weight": weights[1]}]}
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(document))
    code = run_cli(inference.main, inference.parse_args,
                   ["--ensemble", str(path), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weight" in err
    probs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for p in probs:
        pd.DataFrame([[f"{i}.jpg"] + [1 / 18] * 18 for i in range(3)],
                     columns=["ImageID", *PROB_COLUMNS]).to_csv(p, index=False)
    code = run_cli(ensemble_csv.main, ensemble_csv.parse_args,
                   [*map(str, probs), "--soft", "--weights_file", str(path),
                    "-o", str(tmp_path / "vote.csv")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weight" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "vote.csv").exists()


# ---------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def model_dir(tiny_sample, tmp_path_factory, run_flags) -> Path:
    """Two tiny k-fold runs on shared folds and one single run, under one model dir."""
    out = tmp_path_factory.mktemp("experiments")
    flags = lambda *extra: config.parse_args(run_flags(  # noqa: E731
        tiny_sample / "train" / "images", out, "--epochs", "1", "--early_stopping_patience", "0",
        *extra))
    first = train.main(flags("--kfold", "2", "--name", "cv-a"))["run_dir"]
    train.main(flags("--folds", str(first / "folds.csv"), "--name", "cv-b", "--lr", "0.01",
                     "--augmentation", "BaseAugmentation"))
    train.main(flags("--name", "single"))
    return out / "runs"


@pytest.mark.slow
def test_inference_with_the_selection_file_applies_the_selected_weights(
        model_dir, tiny_sample, tmp_path, capsys):
    runs = tmp_path / "model"
    shutil.copytree(model_dir, runs, ignore=shutil.ignore_patterns("single"))
    # --keep_mix: the file holds the two-run mix even when the split-half verdict on these tiny
    # runs would keep the best run alone
    selected = experiments.main(experiments.parse_args(["select", str(runs), "--split_repeats", "1",
                                                        "--keep_mix"]))
    document = json.loads((runs / "selection.json").read_text())
    eval_dir = tiny_sample / "eval"
    common = ["--data_dir", str(eval_dir), "--cache_dir", str(tmp_path / "cache"),
              "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    per_run = {}
    for name in ("cv-a", "cv-b"):  # each run alone: the mean of its folds
        per_run[name] = inference.main(inference.parse_args(
            ["--ensemble", "--model_dir", str(runs / name), "--name_csv", f"{name}.csv",
             "--no_calibrate", *common]))["probs"]

    def expected(doc: dict) -> np.ndarray:
        total = sum(m["weight"] for m in doc["members"])
        return sum(m["weight"] / total * per_run[m["runs"][0]] for m in doc["members"])

    result = inference.main(inference.parse_args(["--ensemble", str(runs / "selection.json"),
                                                  *common]))
    np.testing.assert_allclose(result["probs"], expected(document), atol=1e-6)
    assert [m["weight"] for m in document["members"]] == pytest.approx(
        [m["weight"] for m in selected["members"]])
    offsets = np.asarray(document["calibration"]["offsets"])
    np.testing.assert_array_equal(result["predictions"]["ans"].to_numpy(),
                                  (np.log(np.clip(result["probs"], 1e-12, None))
                                   + offsets).argmax(1))
    # uneven weights, so the check can tell a weighted vote from a plain one
    document["members"] = [{"runs": ["cv-a"], "weight": 3}, {"runs": ["cv-b"], "weight": 1}]
    (runs / "uneven.json").write_text(json.dumps(document))
    uneven = inference.main(inference.parse_args(["--ensemble", str(runs / "uneven.json"),
                                                  "--name_csv", "uneven.csv", *common]))
    np.testing.assert_allclose(uneven["probs"], expected(document), atol=1e-6)
    assert not np.allclose(uneven["probs"], (per_run["cv-a"] + per_run["cv-b"]) / 2, atol=1e-4)
    # ensemble_csv.py with the same file and the runs' probability CSVs: the same submission
    vote = ensemble_csv.main(ensemble_csv.parse_args(
        [str(tmp_path / "out" / "cv-a_probs.csv"), str(tmp_path / "out" / "cv-b_probs.csv"),
         "--soft", "--weights_file", str(runs / "uneven.json"), "-o", str(tmp_path / "v.csv")]))
    assert vote["ans"].tolist() == uneven["predictions"]["ans"].tolist()
    # a run retrained after the selection is refused, nothing written
    with open(runs / "cv-b" / "oof.csv", "a") as f:
        f.write("\n")
    capsys.readouterr()
    code = run_cli(inference.main, inference.parse_args,
                   ["--ensemble", str(runs / "selection.json"), *common[:-1],
                    str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "is not the one selected on" in err and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_table_lists_every_run_folder_and_survives_half_written_ones(model_dir, tmp_path, capsys):
    runs = tmp_path / "model"
    shutil.copytree(model_dir, runs)
    # a per-category k-fold run (its small files, as train.py writes them)
    shutil.copytree(runs / "cv-a", runs / "cv-mask")
    config = json.loads((runs / "cv-mask" / "config.json").read_text())
    (runs / "cv-mask" / "config.json").write_text(json.dumps({**config, "category": "mask"}))
    (runs / "cv-mask" / "oof_metrics.json").write_text(json.dumps({"f1": 0.5, "acc": 0.6}))
    # half-written folders: a config.json alone, a torn summary.csv, nothing at all
    (runs / "just-config").mkdir()
    shutil.copy(runs / "single" / "config.json", runs / "just-config")
    shutil.copytree(runs / "single", runs / "torn")
    (runs / "torn" / "done.json").unlink()
    (runs / "torn" / "summary.csv").write_text("epoch,train_loss,val_l")
    (runs / "empty").mkdir()
    (runs / "edited").mkdir()  # a hand-edited config.json of the wrong types
    (runs / "edited" / "config.json").write_text('{"kfold": "3", "augmentation": ["x"]}')
    (runs / "cv-b" / "oof.csv").unlink()  # killed before the out-of-fold step
    capsys.readouterr()
    table = experiments.main(experiments.parse_args(
        ["table", str(runs), "--csv", str(tmp_path / "t.csv"), "--sort", "oof_f1"]))
    out = capsys.readouterr().out
    by_run = table.set_index("run")
    assert set(by_run.index) == {"cv-a", "cv-b", "cv-mask", "single", "just-config", "torn",
                                 "empty", "edited"}
    oof = json.loads((runs / "cv-a" / "oof_metrics.json").read_text())
    assert by_run.loc["cv-a", "oof_f1"] == pytest.approx(oof["f1"])
    assert by_run.loc["cv-a", "f1_age"] == pytest.approx(oof["f1_age"])
    assert by_run.loc["cv-a", "kind"] == "2-fold" and by_run.loc["cv-a", "status"] == "done"
    assert by_run.loc["cv-a", "folds"] == by_run.loc["cv-b", "folds"]  # shared folds.csv
    assert by_run.loc["cv-mask", "category"] == "mask"
    scores = table["oof_f1"].astype(float)  # --sort oof_f1: largest first, blanks last
    assert scores.notna().tolist() == sorted(scores.notna().tolist(), reverse=True)
    assert scores.dropna().is_monotonic_decreasing and scores.notna().sum() == 3
    summary = pd.read_csv(runs / "single" / "summary.csv")
    assert by_run.loc["single", "val_f1"] == pytest.approx(summary["val_f1"].max())
    assert by_run.loc["single", "wall_s"] > 0 and by_run.loc["single", "epochs"] == "1/1"
    assert "no oof.csv (2/2 folds done)" in by_run.loc["cv-b", "status"]
    assert "no summary.csv" in by_run.loc["just-config", "status"]
    assert "unreadable summary.csv" in by_run.loc["torn", "status"]
    assert "no config.json" in by_run.loc["empty", "status"]
    # the settings that differ between the runs get a column; the same ones do not
    assert {"lr", "augmentation"} <= set(table.columns) and "batch_size" not in table.columns
    assert by_run.loc["cv-b", "lr"] == "0.01"
    assert pd.read_csv(tmp_path / "t.csv")["run"].tolist() == table["run"].tolist()
    assert "cv-mask" in out and "torn" in out
    only = experiments.main(experiments.parse_args(["table", str(runs), "--filter", "cv-*"]))
    assert sorted(only["run"]) == ["cv-a", "cv-b", "cv-mask"]


@pytest.mark.slow
def test_runs_log_tensorboard_hparams(model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for run, metric, expected in (
            ("cv-a", "hparams/oof_f1",
             json.loads((model_dir / "cv-a" / "oof_metrics.json").read_text())["f1"]),
            ("single", "hparams/best_val_f1",
             pd.read_csv(model_dir / "single" / "summary.csv")["val_f1"].max())):
        events = EventAccumulator(str(model_dir / run))
        events.Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
        assert events.Scalars(metric)[-1].value == pytest.approx(expected, abs=1e-6)


def test_ensemble_csv_applies_a_selection_of_one_run_with_its_offsets(tmp_path, capsys):
    ids = [f"{i}.jpg" for i in range(4)]
    probs = np.full((4, 18), 0.02)
    probs[:, 0], probs[:, 1] = 0.5, 0.18  # class 0 wins unless calibrated
    pd.concat([pd.DataFrame({"ImageID": ids}), pd.DataFrame(probs, columns=PROB_COLUMNS)],
              axis=1).to_csv(tmp_path / "a_probs.csv", index=False)
    offsets = [0.0] * 18
    offsets[1] = 2.0  # log 0.18 + 2 > log 0.5
    (tmp_path / "s.json").write_text(json.dumps({
        "format": "maskface-selection/1", "runs": {"a": {"path": "a"}},
        "members": [{"runs": ["a"], "weight": 1.0}], "calibration": {"offsets": offsets}}))
    argv = [str(tmp_path / "a_probs.csv"), "--soft", "--weights_file", str(tmp_path / "s.json")]
    vote = ensemble_csv.main(ensemble_csv.parse_args(argv + ["-o", str(tmp_path / "v.csv")]))
    assert vote["ans"].tolist() == [1] * 4 and "member a" in capsys.readouterr().out
    plain = ensemble_csv.main(ensemble_csv.parse_args(argv + ["-o", str(tmp_path / "p.csv"),
                                                              "--no_calibrate"]))
    assert plain["ans"].tolist() == [0] * 4


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder; --ensemble takes a selection JSON"),
    ("with_model_dir", "names its runs; drop --model_dir"),
    ("not_a_selection", "not a selection file of experiments.py select"),
    ("run_gone", "run a: no folder"),
    ("trio_of_two", "expected \"runs\": 1 run (or a trio of 3)"),
])
def test_inference_refuses_a_bad_selection_file_in_one_line(tmp_path, capsys, case, message):
    (tmp_path / "a").mkdir()
    document = {"format": "maskface-selection/1", "runs": {"a": {"path": "a"}},
                "members": [{"runs": ["a"], "weight": 1}]}
    path, extra = tmp_path / "selection.json", []
    if case == "folder":
        path = tmp_path / "a"
    elif case == "with_model_dir":
        extra = ["--model_dir", str(tmp_path / "a")]
    elif case == "not_a_selection":
        document.pop("format")
    elif case == "run_gone":
        (tmp_path / "a").rmdir()
    elif case == "trio_of_two":
        document["members"] = [{"runs": ["a", "a"], "weight": 1}]
    (tmp_path / "selection.json").write_text(json.dumps(document))
    code = run_cli(inference.main, inference.parse_args,
                   ["--ensemble", str(path), *extra, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_hidden_run_folder_is_listed_by_the_table(finished_run, tmp_path):
    models = tmp_path / "model"
    shutil.copytree(finished_run, models / ".baseline")
    shutil.copytree(finished_run, models / "visible")
    (models / ".cache").mkdir()  # not a run
    table = experiments.main(experiments.parse_args(["table", str(models)]))
    assert sorted(table["run"]) == [".baseline", "visible"]


def test_the_file_holds_what_the_verdict_recommends_unless_keep_mix(tmp_path, capsys):
    photos = people(60)
    labels = photos["label"].to_numpy()
    # pure noise lifts the OOF F1 by chance; the split-half check does not confirm it
    write_oof_run(tmp_path / "model" / "noise", photos, noisy_probs(labels, 0.0, 18, 1))
    write_oof_run(tmp_path / "model" / "good", photos, noisy_probs(labels, 2.5, 18, 2))
    experiments.main(experiments.parse_args(["select", str(tmp_path / "model")]))
    document = json.loads((tmp_path / "model" / "selection.json").read_text())
    assert document["members"] == [{"runs": ["good"], "weight": 1.0, "picked": 1}]
    assert set(document["runs"]) == {"good"}
    verdict = document["verdict"]
    assert verdict["applied"][0].startswith("the best single run good alone")
    assert "noise" in [m["runs"][0] for m in verdict["selected"]["members"]]
    assert not verdict["kept_mix"] and "safer: --steps 1" in verdict["text"]
    assert "holds what the verdict recommends" in capsys.readouterr().out

    experiments.main(experiments.parse_args(["select", str(tmp_path / "model"), "--keep_mix",
                                             "-o", str(tmp_path / "mix.json")]))
    kept = json.loads((tmp_path / "mix.json").read_text())
    assert kept["members"] == verdict["selected"]["members"] and kept["verdict"]["kept_mix"]
    assert set(kept["runs"]) == {"noise", "good"} and kept["verdict"]["applied"] == []
    assert "--keep_mix: the selection file holds the selected mix" in capsys.readouterr().out


def note_cli(capsys, *argv) -> tuple[int, str]:
    code = run_cli(experiments.main, experiments.parse_args, ["note", *map(str, argv)])
    return code, capsys.readouterr().err


def test_notes_are_kept_and_the_table_shows_and_sorts_by_the_latest(finished_run, tmp_path,
                                                                     capsys, monkeypatch):
    models = tmp_path / "model"
    for name in ("a", "b", "c"):
        shutil.copytree(finished_run, models / name)
    record = json.loads((models / "b" / "config.json").read_text())
    record["tracking"].update(commit="0123456789" * 4, dirty=True)
    (models / "b" / "config.json").write_text(json.dumps(record))
    assert note_cli(capsys, models / "a", "--lb", "0.61", "--text", "first\ntry")[0] == 0
    assert note_cli(capsys, models / "a", "--text", "  tta   flip ")[0] == 0
    assert note_cli(capsys, models / "b", "--lb", 0.7421)[0] == 0
    notes = json.loads((models / "a" / "note.json").read_text())["notes"]
    assert [(n["lb"], n["text"]) for n in notes] == [(0.61, "first try"), (None, "tta flip")]
    assert all(n["time"].endswith("+00:00") for n in notes)
    monkeypatch.chdir(tmp_path)
    table = experiments.main(experiments.parse_args(["table", "model", "--sort", "lb"]))
    out = capsys.readouterr().out
    assert table["run"].tolist() == ["b", "a", "c"]  # largest lb first, none last
    by_run = table.set_index("run")
    assert by_run.loc["a", "lb"] == 0.61 and by_run.loc["a", "note"] == "tta flip"
    assert by_run.loc["b", "commit"] == "0123456*"
    assert by_run.loc["a", "path"] == str(Path("model") / "a")
    assert "0.7421" in out and "tta flip" in out and "0123456*" in out


@pytest.mark.parametrize("argv, message", [
    (["{run}/fold9"], "not a run folder (no config.json there)"),
    (["{run}"], "give --lb SCORE, --text TEXT or both"),
    (["{run}", "--lb", "74.21"], "--lb 74.21: expected a macro F1 score from 0 to 1"),
    (["{run}", "--lb", "nan"], "--lb nan: expected a macro F1 score from 0 to 1"),
    (["{run}", "--text", " "], "--text: empty"),
    (["{run}", "--lb", "0.5", "--note_json", "bad"], "note.json: expected {\"notes\""),
])
def test_a_bad_note_is_one_line_and_writes_nothing(run_copy, capsys, argv, message):
    if "--note_json" in argv:
        argv = argv[:-2]
        (run_copy / "note.json").write_text('{"notes": 3}')
    before = sorted(p.name for p in run_copy.iterdir())
    code, err = note_cli(capsys, *(a.format(run=run_copy) for a in argv))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in run_copy.iterdir()) == before
