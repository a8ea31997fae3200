"""Trust, second pass (issue 23): every door into a run is checked against what the run is (its
recorded settings, its identity, its folds), each fault reproduced through a public interface:
--resume with --config, null settings, a config.json missing keys, a checkpoint of another run,
folds re-split or edited, a one-fold folds file, overflowing vote weights, outputs over inputs,
the sample generator and a user's file, a one-image last batch; and the rough edges (a dead
augmentation worker, a torn face-box cache header, "epochs" rewritten by a refused or shortened
resume, a selection file without oof_sha256, read-only outputs, --name ' ', hidden run folders)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ensemble_csv
import experiments
import inference
import train
from maskface import config, dataset, face, sample, selection
from maskface.cli import UserError, run_cli
from maskface.ensemble import weighted_probabilities

# a folder no user can write, root included (sysfs refuses new files): a read-only output
UNWRITABLE = Path("/sys") if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def trained_run(tiny_sample, tmp_path_factory, run_flags) -> Path:
    """A finished 2-epoch run on the tiny sample (each test copies it before changing it)."""
    out = tmp_path_factory.mktemp("trust")
    flags = run_flags(tiny_sample / "train" / "images", out, "--epochs", "2", "--name", "base",
                      "--early_stopping_patience", "0")
    return train.main(config.parse_args(flags))["run_dir"]


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of trained_run that a test may change."""
    return Path(shutil.copytree(trained_run, tmp_path / "runs" / "copy"))


@pytest.fixture()
def own_eval_dir(tiny_sample, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_sample / "eval", tmp_path / "eval"))


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    for key, new in changes.items():
        if new is KeyError:
            value.pop(key)
        else:
            value[key] = new
    path.write_text(json.dumps(value, indent=2))


# ---------------------------------------------------------------- 1. --resume with --config
def test_resume_with_config_is_refused_and_the_run_untouched(run_copy, tmp_path):
    other = tmp_path / "other.json"
    record = json.loads((run_copy / "config.json").read_text())
    other.write_text(json.dumps({**record, "lr": 0.5, "seed": 7, "optimizer": "sgd"}))
    before = (run_copy / "config.json").read_text()
    # before: the other file was replayed over the run (folds of one run at different lr/seed)
    with pytest.raises(UserError, match=r"--resume .* and --config .*other\.json: give one"):
        config.parse_args(["--resume", str(run_copy), "--config", str(other)])
    assert (run_copy / "config.json").read_text() == before


# ---------------------------------------------------------------- 2. null in config.json
@pytest.mark.parametrize("key", ["scheduler", "amp", "normalize", "model", "criterion",
                                 "cache_dir", "device"])
def test_null_in_config_json_is_refused_where_the_flag_has_a_default(tmp_path, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({key: None}))
    with pytest.raises(UserError, match=rf"config\.json: setting '{key}' is null; expected"):
        config.parse_args(["--config", str(path)])


def test_null_stays_allowed_where_the_default_is_none(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"crop": None, "tmax": None, "rrc_scale": None}))
    args = config.parse_args(["--config", str(path)])
    assert args.crop is None and args.tmax is None and args.rrc_scale is None


# ---------------------------------------------------------------- 3. config.json missing keys
def test_a_deleted_setting_is_taken_from_the_checkpoints(run_copy):
    edit_json(run_copy / "config.json", lr=KeyError)
    # before: --lr 0.3 was accepted (not in config.json, so not compared) while training went on
    # at the checkpoint's lr
    with pytest.raises(UserError, match=r"--lr 0\.3 differs from the run's 0\.001"):
        config.parse_args(["--resume", str(run_copy), "--lr", "0.3"])
    assert config.parse_args(["--resume", str(run_copy)]).lr == 0.001


def test_a_record_that_disagrees_with_its_checkpoints_is_refused(run_copy):
    edit_json(run_copy / "config.json", lr=0.3)
    with pytest.raises(UserError, match=r"config\.json: 'lr' is 0\.3 but .*last\.pth trained "
                                        r"with 0\.001; the record and the checkpoint disagree"):
        config.parse_args(["--resume", str(run_copy)])


# ---------------------------------------------------------------- 4. a checkpoint of another run
@pytest.mark.slow
def test_a_last_pth_of_another_run_is_refused(run_copy, trained_run, tiny_train_dir, tmp_path,
                                              run_flags):
    # the same flags: only the run's identity tells the checkpoints apart
    other = train.main(config.parse_args(run_flags(
        tiny_train_dir, tmp_path, "--epochs", "1", "--name", "other",
        "--early_stopping_patience", "0")))["run_dir"]
    shutil.copy(other / "last.pth", run_copy / "last.pth")
    with pytest.raises(UserError, match=r"last\.pth: belongs to another run \(run id"):
        config.parse_args(["--resume", str(run_copy), "--epochs", "3"])


@pytest.mark.slow
def test_best_pth_of_another_run_is_refused_by_resume_and_inference(run_copy, tiny_train_dir,
                                                                    own_eval_dir, tmp_path,
                                                                    run_flags):
    other = train.main(config.parse_args(run_flags(
        tiny_train_dir, tmp_path, "--epochs", "1", "--name", "other",
        "--early_stopping_patience", "0")))["run_dir"]
    shutil.copy(other / "best.pth", run_copy / "best.pth")
    with pytest.raises(UserError, match=r"best\.pth: belongs to another run"):
        config.parse_args(["--resume", str(run_copy)])
    with pytest.raises(UserError, match=r"best\.pth: belongs to another run"):
        inference.main(inference.parse_args([
            "--model_dir", str(run_copy), "--data_dir", str(own_eval_dir), "--output_dir",
            str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]))


def test_best_pth_of_another_epoch_than_done_json_names_is_refused(run_copy):
    done = json.loads((run_copy / "done.json").read_text())
    edit_json(run_copy / "done.json", best_epoch=3 - done["best_epoch"])  # the other epoch
    with pytest.raises(UserError, match=r"best\.pth: holds epoch \d, but .*done\.json names "
                                        r"epoch \d as the best"):
        config.parse_args(["--resume", str(run_copy)])


# ---------------------------------------------------------------- 5. folds re-split or edited
@pytest.mark.slow
def test_another_fold_with_another_seed_is_refused_and_folds_kept(tiny_train_dir, tmp_path,
                                                                   run_flags):
    flags = run_flags(tiny_train_dir, tmp_path, "--kfold", "2", "--epochs", "1", "--name", "cv",
                      "--early_stopping_patience", "0")
    run_dir = train.main(config.parse_args(flags + ["--fold", "0", "--seed", "1"]))["run_dir"]
    folds = (run_dir / "folds.csv").read_text()
    # before: fold 1 re-split with seed 2 and overwrote folds.csv, so fold 0's model scored in
    # oof.csv people it had trained on
    with pytest.raises(UserError, match=r"--seed 2 differs from the run's 1"):
        train.main(config.parse_args(flags + ["--fold", "1", "--seed", "2"]))
    assert (run_dir / "folds.csv").read_text() == folds
    # folds.csv rotated by hand after fold 0 finished: photos.csv still holds the roles
    table = pd.read_csv(run_dir / "folds.csv")
    table["fold"] = 1 - table["fold"]
    table.to_csv(run_dir / "folds.csv", index=False)
    with pytest.raises(UserError, match=r"folds\.csv: photo .* is in fold \d but .*photos\.csv "
                                        r"recorded \d"):
        train.main(config.parse_args(["--resume", str(run_dir)]))
    assert not (run_dir / "oof.csv").exists() and not (run_dir / "fold1").exists()


# ---------------------------------------------------------------- 6. a folds file of one fold
def test_a_folds_file_with_a_single_fold_is_refused(tiny_train_dir, tmp_path, run_flags):
    profiles = sorted(p.name for p in tiny_train_dir.iterdir() if p.is_dir())
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"profile": profiles, "fold": 0}).to_csv(folds, index=False)
    with pytest.raises(UserError, match=r"folds\.csv: 1 fold\(s\); expected 2 or more"):
        train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--folds", str(folds))))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- 7. huge weights
def test_huge_weights_are_normalised_without_overflow(tmp_path):
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(18), size=5) for _ in range(3)]
    voted = weighted_probabilities(probs, [1e308, 1e308, 1e308])
    np.testing.assert_allclose(voted, np.mean(probs, axis=0))
    for bad in ([np.inf, 1, 1], [np.nan, 1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="weights"):
            weighted_probabilities(probs, bad)
    paths = []
    for k, p in enumerate(probs):
        table = pd.DataFrame(p, columns=[f"p{c}" for c in range(18)])
        table.insert(0, "ImageID", [f"{i}.jpg" for i in range(5)])
        paths.append(tmp_path / f"m{k}_probs.csv")
        table.to_csv(paths[-1], index=False)
    for vote in (["--soft"], []):
        if not vote:  # hard vote: the submissions of the same models
            paths = [_as_submission(p) for p in paths]
        out = tmp_path / f"vote{len(vote)}.csv"
        voted_table = ensemble_csv.main(ensemble_csv.parse_args(
            [*map(str, paths), *vote, "--weights", "1e308", "1e308", "1e308", "-o", str(out)]))
        expected = np.mean(probs, axis=0).argmax(1) if vote else \
            pd.read_csv(paths[0])["ans"].to_numpy()
        if vote:
            assert (voted_table["ans"].to_numpy() == expected).all()
        else:  # equal weights: the same answers as an unweighted vote
            plain = ensemble_csv.main(ensemble_csv.parse_args(
                [*map(str, paths), "-o", str(tmp_path / "plain.csv")]))
            assert (voted_table["ans"].to_numpy() == plain["ans"].to_numpy()).all()


def _as_submission(probs_csv: Path) -> Path:
    table = pd.read_csv(probs_csv)
    out = probs_csv.with_name(probs_csv.name.replace("_probs", ""))
    pd.DataFrame({"ImageID": table["ImageID"],
                  "ans": table.filter(like="p").to_numpy().argmax(1)}).to_csv(out, index=False)
    return out


# ---------------------------------------------------------------- 8. outputs over inputs
@pytest.mark.parametrize("where, name", [("eval", "answers.csv"), ("eval", "info.csv"),
                                         ("run", "oof.csv"), ("run", "config.json.csv")])
def test_inference_never_writes_over_its_inputs(run_copy, own_eval_dir, tmp_path, where, name):
    folder = own_eval_dir if where == "eval" else run_copy
    before = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if where == "run":  # the file the issue names: a k-fold run's predictions
        (run_copy / "oof.csv").write_text("path,profile,fold,label\n")
        before[run_copy / "oof.csv"] = (run_copy / "oof.csv").read_bytes()
    answers = ["--answers", str(own_eval_dir / "answers.csv")] if name == "answers.csv" else []
    with pytest.raises(UserError, match=r"the submission (would overwrite the input|inside)"):
        inference.main(inference.parse_args([
            "--model_dir", str(run_copy), "--data_dir", str(own_eval_dir), "--output_dir",
            str(folder), "--name_csv", name, "--cache_dir", str(tmp_path / "cache"),
            "--device", "cpu", *answers]))
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "cache").exists()  # refused before any work


# ---------------------------------------------------------------- 9. the sample and a user's file
def test_the_sample_generator_never_deletes_a_users_file(tmp_path):
    out = sample.generate_sample(tmp_path / "s", n_train_people=2, n_eval_people=1, seed=0)
    notes = out / "train" / "notes.txt"
    notes.write_text("mine")
    # before: the whole folder was replaced, notes.txt with it
    with pytest.raises(UserError, match=r"holds 1 file\(s\) the sample generator did not write "
                                        r"\(first: train/notes\.txt\)"):
        sample.generate_sample(out, n_train_people=3, n_eval_people=1, seed=0)
    assert notes.read_text() == "mine"
    notes.unlink()
    sample.generate_sample(out, n_train_people=3, n_eval_people=1, seed=0)  # only its own files
    assert len([p for p in (out / "train" / "images").iterdir()]) == 3


def test_the_sample_command_refuses_in_one_line(tmp_path, capsys):
    out = sample.generate_sample(tmp_path / "s", n_train_people=2, n_eval_people=1, seed=0)
    (out / "mine.csv").write_text("a,b\n")
    code = run_cli(sample.main, sample.get_args_parser().parse_args,
                   ["--out", str(out), "--n_train_people", "3", "--n_eval_people", "1"])
    assert code == 2 and "mine.csv" in capsys.readouterr().err
    assert (out / "mine.csv").is_file()


# ---------------------------------------------------------------- 10. a one-image last batch
def test_a_one_image_last_batch_is_merged_and_other_tails_unchanged():
    def sizes(n: int, batch: int) -> list[int]:
        images = np.zeros((n, 4, 4, 3), dtype=np.uint8)
        batches = dataset.CachedBatches(images, np.zeros(n, dtype=int), np.arange(n), batch,
                                        shuffle=True)
        picks = batches.batch_picks()
        assert len(picks) == len(batches)
        return [len(p) for p in picks]
    assert sizes(33, 32) == [33]
    assert sizes(49, 16) == [16, 16, 17]
    assert sizes(34, 32) == [32, 2] and sizes(64, 32) == [32, 32] and sizes(1, 32) == [1]
    # batch sizes without a one-image tail draw exactly the batches they always drew
    images = np.zeros((50, 4, 4, 3), dtype=np.uint8)
    batches = dataset.CachedBatches(images, np.zeros(50, dtype=int), np.arange(50), 16,
                                    shuffle=True)
    torch.manual_seed(3)
    drawn = batches.batch_picks()
    torch.manual_seed(3)
    order = torch.randperm(50)
    assert all(torch.equal(a, b) for a, b in zip(drawn, order.split(16)))


@pytest.mark.slow
def test_training_with_a_one_image_last_batch_finishes(tiny_train_dir, tmp_path, run_flags):
    n_photos = sum(1 for _ in tiny_train_dir.glob("*/*.jpg"))
    # before: "Expected more than 1 value per channel when training" after the epoch's work
    result = train.main(config.parse_args(run_flags(
        tiny_train_dir, tmp_path, "--val_ratio", "0", "--batch_size", str(n_photos - 1),
        "--epochs", "1")))
    assert (result["run_dir"] / "done.json").is_file()


# ---------------------------------------------------------------- rough edges
KILLER = '''
import multiprocessing
import os

from torchvision.transforms import v2


def _die_in_a_worker(image):
    if multiprocessing.parent_process() is not None:  # a worker: as the OOM killer would
        os._exit(1)
    return image


def build():
    return v2.Compose([v2.Lambda(_die_in_a_worker)])
'''


@pytest.mark.slow
def test_a_dead_augmentation_worker_is_one_line(tiny_train_dir, tmp_path, run_flags, capsys):
    module = tmp_path / "killer.py"
    module.write_text(KILLER)
    code = run_cli(train.main, config.parse_args, run_flags(
        tiny_train_dir, tmp_path, "--augmentation", f"{module}:build", "--augment_workers", "1",
        "--epochs", "1"))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "an augmentation worker process died" in err and "Traceback" not in err


def test_a_face_box_cache_torn_in_its_header_is_rebuilt(tiny_train_dir, tmp_path):
    paths = [str(p) for p in sorted(tiny_train_dir.glob("*/mask1.jpg"))[:2]]
    cache_file = tmp_path / "face_boxes.csv"
    cache_file.write_text("path,size,mtime")  # a write cut short inside the header
    warnings: list[str] = []
    table, detected = face.detect_boxes(paths, None, cache_file, warn=warnings.append)
    assert len(table) == 2 and detected == 2
    assert any("torn inside its header; it is rebuilt" in w for w in warnings)
    assert pd.read_csv(cache_file)["path"].tolist() == [os.path.abspath(p) for p in paths]


def test_a_refused_resume_leaves_config_json_as_it_was(run_copy, tiny_train_dir, tmp_path):
    data = Path(shutil.copytree(tiny_train_dir, tmp_path / "data" / "images"))
    photo = sorted(data.glob("*/mask2.jpg"))[0]
    photo.write_bytes(sorted(data.glob("*/mask3.jpg"))[5].read_bytes())
    (run_copy / "photos.csv").unlink()  # a run without its photo record: last.pth still knows
    before = (run_copy / "config.json").read_text()
    with pytest.raises(UserError, match=r"the training data's fingerprint .* differs"):
        train.main(config.parse_args(["--resume", str(run_copy), "--epochs", "3",
                                      "--data_dir", str(data)]))
    assert (run_copy / "config.json").read_text() == before
    assert not (run_copy / "photos.csv").exists()


def test_a_shortened_resume_keeps_the_recorded_epochs(run_copy):
    train.main(config.parse_args(["--resume", str(run_copy), "--epochs", "1"]))
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 2  # trained 2 of 2


def test_a_selection_file_without_oof_sha256_is_refused(tmp_path):
    run_dir = tmp_path / "cv"
    run_dir.mkdir()
    (run_dir / "oof.csv").write_text("path,profile,fold,label\n")
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": selection.SELECTION_FORMAT,
                                "runs": {"cv": {"path": "cv", "category": "multi"}},
                                "members": [{"runs": ["cv"], "weight": 1.0}]}))
    # before: without the key the retrained-run check was silently skipped
    with pytest.raises(UserError, match=r"run cv: no \"oof_sha256\""):
        selection.read_selection(path)


def test_huge_selection_weights_are_read(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"format": selection.SELECTION_FORMAT,
                                "runs": {"a": {"path": "a"}, "b": {"path": "b"}},
                                "members": [{"runs": ["a"], "weight": 1e308},
                                            {"runs": ["b"], "weight": 1e308}]}))
    assert len(selection.read_selection_json(path)["members"]) == 2


@pytest.mark.skipif(UNWRITABLE is None, reason="needs root for an unwritable folder")
def test_a_read_only_output_folder_is_found_before_the_work(run_copy, own_eval_dir, tmp_path):
    # before: the models loaded, the images decoded and predicted, then the write failed
    with pytest.raises(UserError, match=r"--output_dir /sys: /sys is not writable"):
        inference.main(inference.parse_args([
            "--model_dir", str(run_copy), "--data_dir", str(own_eval_dir), "--output_dir",
            str(UNWRITABLE), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]))
    assert not (tmp_path / "cache").exists()


def oof_run(run_dir: Path, seed: int) -> Path:
    """The files of a finished k-fold run that selection reads (config.json, folds.csv, oof.csv),
    for 12 people in 3 folds with random probabilities."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"category": "multi", "kfold": 3}))
    profiles = [f"{k:06d}_male_Asian_20" for k in range(12)]
    pd.DataFrame({"profile": profiles, "fold": [k % 3 for k in range(12)]}).to_csv(
        run_dir / "folds.csv", index=False)
    table = pd.DataFrame({"path": [f"/d/{p}/mask1.jpg" for p in profiles], "profile": profiles,
                          "fold": [k % 3 for k in range(12)], "label": [k % 18 for k in range(12)]})
    probs = pd.DataFrame(rng.dirichlet(np.ones(18), 12), columns=[f"p{c}" for c in range(18)])
    pd.concat([table, probs], axis=1).to_csv(run_dir / "oof.csv", index=False)
    return run_dir


@pytest.mark.skipif(UNWRITABLE is None, reason="needs root for an unwritable folder")
def test_experiments_select_finds_a_read_only_output_before_the_work(tmp_path, capsys):
    runs = [str(oof_run(tmp_path / name, seed)) for seed, name in enumerate(("a", "b"))]
    code = run_cli(experiments.main, experiments.parse_args,
                   ["select", *runs, "-o", str(UNWRITABLE / "sel.json")])
    err = capsys.readouterr().err
    assert code == 2 and "/sys is not writable" in err, err


def test_a_blank_run_name_is_refused():
    for name in (" ", "  exp", "exp "):
        with pytest.raises(UserError, match=r"--name '.*': expected a plain folder name"):
            config.check_flags(config.parse_args(["--name", name]))


def test_a_hidden_run_folder_is_listed_by_the_table(trained_run, tmp_path):
    models = tmp_path / "model"
    shutil.copytree(trained_run, models / ".baseline")
    shutil.copytree(trained_run, models / "visible")
    (models / ".cache").mkdir()  # not a run
    table = experiments.main(experiments.parse_args(["table", str(models)]))
    assert sorted(table["run"]) == [".baseline", "visible"]
