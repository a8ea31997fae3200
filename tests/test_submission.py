"""maskface.submission: the submission's rows checked, every fold's checkpoint found in order."""
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maskface import submission
from maskface.cli import UserError


def test_validate_submission_rejects_bad_rows():
    info = pd.DataFrame({"ImageID": ["a.jpg", "b.jpg", "c.jpg"]})
    good = pd.DataFrame({"ImageID": ["a.jpg", "b.jpg", "c.jpg"], "ans": np.array([0, 17, 5])})
    submission.validate_submission(info, good)
    for bad, message in [
        (good.assign(ans=[0, 18, 5]), "not an integer 0..17"),
        (good.assign(ans=[0, -1, 5]), "not an integer 0..17"),
        (good.assign(ans=[0.0, 1.5, 5.0]), "expected integers"),
        (good.iloc[[1, 0, 2]].reset_index(drop=True), "order"),
        (good.iloc[:2], "count"),
    ]:
        with pytest.raises(UserError, match=message):
            submission.validate_submission(info, bad)


def test_find_checkpoints_takes_every_fold_in_order(tmp_path):
    kfold = tmp_path / "kfold"
    for fold in (0, 1, 2, 10):
        (kfold / f"fold{fold}").mkdir(parents=True)
        (kfold / f"fold{fold}" / "best.pth").touch()
    single = tmp_path / "single"
    single.mkdir()
    (single / "best.pth").touch()
    found = submission.find_checkpoints([kfold, single])
    assert [p.parent.name for p in found] == ["fold0", "fold1", "fold2", "fold10", "single"]
    with pytest.raises(UserError, match="more than once"):
        submission.find_checkpoints([single, single / "best.pth"])
    (kfold / "fold2" / "best.pth").unlink()
    with pytest.raises(UserError, match="fold2 has no best.pth"):
        submission.find_checkpoints([kfold])
    with pytest.raises(UserError, match="no best.pth"):
        submission.find_checkpoints([tmp_path / "single" / ".."])


# ---------------------------------------------------------------------------- runs weigh alike
def fake_runs(root):
    """A finished 3-fold run, a finished single run and an unfinished one, as inference finds
    them (no network inside: the tests stub the loading and predicting)."""
    import json
    kfold, single, killed = root / "cv", root / "single", root / "killed"
    for fold in range(3):
        (kfold / f"fold{fold}").mkdir(parents=True)
        (kfold / f"fold{fold}" / "best.pth").touch()
    (kfold / "oof.csv").touch()
    for run in (single, killed):
        run.mkdir()
        (run / "best.pth").touch()
    (single / "done.json").write_text(json.dumps({"best_f1": 0.5}))
    return kfold, single, killed


@pytest.fixture()
def stubbed_models(monkeypatch):
    """Every checkpoint predicts known probabilities (by its path); nothing is decoded."""
    from types import SimpleNamespace
    known: dict[str, np.ndarray] = {}
    loaded: list = []

    def load_models(paths, **_):
        loaded.extend(paths)
        return [SimpleNamespace(path=p, category="multi", name="fake", preprocess=None)
                for p in paths]

    def probs_of(path):
        seed = sum(map(ord, str(path)))
        p = np.random.default_rng(seed).random((known["n"], 18)) + 0.01
        return known.setdefault(str(path), p / p.sum(1, keepdims=True))

    monkeypatch.setattr(submission, "load_models", load_models)
    monkeypatch.setattr(submission, "build_image_caches", lambda models, *_: [None] * len(models))
    monkeypatch.setattr(submission, "predict_model", lambda m, *_, **__: probs_of(m.path))
    return SimpleNamespace(known=known, loaded=loaded, probs_of=probs_of)


def infer_stubbed(tiny_sample, tmp_path, *flags):
    import inference
    return inference.main(inference.parse_args([
        "--data_dir", str(tiny_sample / "eval"), "--output_dir", str(tmp_path / "out"),
        "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", *map(str, flags)]))


def test_a_3_fold_run_and_a_single_run_weigh_half_each(tiny_sample, tmp_path, stubbed_models,
                                                       capsys):
    kfold, single, _ = fake_runs(tmp_path / "model")
    stubbed_models.known["n"] = len(pd.read_csv(tiny_sample / "eval" / "info.csv"))
    folds = np.mean([stubbed_models.probs_of(kfold / f"fold{k}" / "best.pth") for k in range(3)], 0)
    alone = stubbed_models.probs_of(single / "best.pth")
    result = infer_stubbed(tiny_sample, tmp_path, "--ensemble", "--model_dir", kfold, single)
    np.testing.assert_allclose(result["probs"], 0.5 * folds + 0.5 * alone)
    out = capsys.readouterr().out
    assert f"{single / 'best.pth'}  0.5000 of the vote" in out
    assert f"{kfold / 'fold0' / 'best.pth'}  0.1667 of the vote" in out
    weighted = infer_stubbed(tiny_sample, tmp_path, "--ensemble", "--model_dir", kfold, single,
                             "--weights", "3", "1")
    np.testing.assert_allclose(weighted["probs"], 0.75 * folds + 0.25 * alone)


@pytest.mark.parametrize("flags, message", [
    (["--ensemble", "--weights", "1"], r"--weights: 1 weight\(s\) for 2 run\(s\)"),
    (["--ensemble", "--weights", "1", "-2"], "expected positive finite numbers"),
    (["--weights", "1", "1"], "--weights weighs the runs of an ensemble; add --ensemble"),
], ids=["count", "negative", "no_ensemble"])
def test_bad_weights_fail_in_one_line_before_any_model_loads(tiny_sample, tmp_path, stubbed_models,
                                                             capsys, flags, message):
    import inference
    from maskface.cli import run_cli
    kfold, single, _ = fake_runs(tmp_path / "model")
    code = run_cli(inference.main, inference.parse_args, [
        "--model_dir", str(kfold), str(single), "--data_dir", str(tiny_sample / "eval"),
        "--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err)
    assert err.count("\n") == 1 and not stubbed_models.loaded
    assert not (tmp_path / "out" / "output.csv").exists()


def test_a_model_dir_means_its_finished_runs(tiny_sample, tmp_path, stubbed_models, capsys):
    kfold, single, killed = fake_runs(tmp_path / "model")
    stubbed_models.known["n"] = len(pd.read_csv(tiny_sample / "eval" / "info.csv"))
    infer_stubbed(tiny_sample, tmp_path, "--ensemble", "--model_dir", tmp_path / "model")
    assert stubbed_models.loaded == [kfold / f"fold{k}" / "best.pth" for k in range(3)] + [
        single / "best.pth"]
    out = capsys.readouterr().out
    assert "skipped 1 unfinished run(s)" in out and "killed" in out
    for run in (kfold, single):
        shutil.rmtree(run)
    with pytest.raises(UserError, match="no finished run inside"):
        infer_stubbed(tiny_sample, tmp_path, "--ensemble", "--model_dir", tmp_path / "model")


@pytest.mark.parametrize("name, written", [("effb0", "effb0.csv"), ("effb0.csv", "effb0.csv"),
                                           ("v1.2.csv", "v1.2.csv")])
def test_name_csv_without_an_extension_gets_csv(tmp_path, name, written):
    output, probs = submission.output_paths(tmp_path, name)
    assert output == tmp_path / written and probs == tmp_path / f"{Path(written).stem}_probs.csv"


@pytest.mark.parametrize("name", ["effb0.txt", "sub/effb0", "effb0.CSV.gz"])
def test_name_csv_with_another_extension_or_a_folder_is_refused(tmp_path, name):
    with pytest.raises(UserError, match=r"--name_csv .*: expected a file name ending in \.csv"):
        submission.output_paths(tmp_path, name)
