"""maskface.run_folder: run folder numbering, no folder left by a failure before the first
checkpoint, the photo record a --resume checks, and the run's identity at every door: a deleted or
edited config.json setting, a last.pth or best.pth of another run or of another epoch."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import inference
import train
from maskface import (
    config,
    engine,
    run_folder,
)
from maskface.cli import UserError


@pytest.mark.slow
def test_a_resume_on_changed_photos_is_refused_unless_accepted(own_train_dir, tmp_path, run_flags,
        replace_keeping_size_and_date):
    run_dir = train.main(config.parse_args(run_flags(own_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    photo = sorted(own_train_dir.glob("*/mask3.jpg"))[2]
    replace_keeping_size_and_date(photo)
    relative = photo.relative_to(own_train_dir)
    with pytest.raises(UserError, match=rf"the training data changed since the run started: 1 "
                                        rf"photo\(s\) changed in content or label \(first: "
                                        rf"{relative}\); add --accept_data_change"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    shutil.copytree(own_train_dir / relative.parent, own_train_dir / "999999_male_Asian_33")
    with pytest.raises(UserError, match=r"7 photo\(s\) added \(first: 999999_male_Asian_33/"):
        train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    resumed = train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2",
                                           "--accept_data_change"]))
    assert len(resumed["summary"]) == 2
    photos = pd.read_csv(run_dir / "photos.csv")
    assert not photos["profile"].str.startswith("999999").any()  # the new person was left out


def test_run_folder_numbering_with_dotted_names(tmp_path):
    names = [run_folder.new_run_dir(tmp_path, "lr1e-3.v2").name for _ in range(3)]
    assert names == ["lr1e-3.v2", "lr1e-3.v22", "lr1e-3.v23"]
    assert [run_folder.new_run_dir(tmp_path, "exp").name for _ in range(2)] == ["exp", "exp2"]


def test_any_failure_before_the_first_checkpoint_leaves_no_folder(tiny_train_dir, tmp_path, run,
                                                                  monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "train_one_epoch", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tiny_train_dir, tmp_path, "--epochs", "1", "--name", "oom")
    assert not (tmp_path / "runs" / "oom").exists()


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    for key, new in changes.items():
        if new is KeyError:
            value.pop(key)
        else:
            value[key] = new
    path.write_text(json.dumps(value, indent=2))


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


@pytest.mark.slow
def test_a_last_pth_of_another_run_is_refused(run_copy, finished_run, tiny_train_dir, tmp_path,
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
