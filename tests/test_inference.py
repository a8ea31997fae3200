"""inference.py, the script: submissions from trained run folders, resize and views, several
models and calibration, one-line failures before any work (outputs never written over inputs)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import inference
import train
from maskface import config, dataset, labels, submission
from maskface.cli import UserError, run_cli
from maskface.labels import PROB_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- with trained runs
@pytest.fixture(scope="module")
def trained_run(tiny_sample, tmp_path_factory, run_flags) -> Path:
    """A BaseModel (with dropout) trained one epoch at 48x32 on the tiny sample."""
    args = config.parse_args(run_flags(tiny_sample / "train" / "images",
                                      tmp_path_factory.mktemp("runs"), "--epochs", "1",
                                      "--resize", "48", "32", "--drop_rate", "0.5",
                                      "--val_ratio", "0"))
    return Path(train.main(args)["run_dir"])


def infer(tiny_sample, out: Path, model_dirs, *flags: str) -> dict:
    argv = ["--model_dir", *map(str, model_dirs), "--data_dir", str(tiny_sample / "eval"),
            "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--device", "cpu", *flags]
    return inference.main(inference.parse_args(argv))


@pytest.mark.slow
def test_submission_order_resize_and_scores(tiny_sample, trained_run, tmp_path, capsys):
    answers_path = tiny_sample / "eval" / "answers.csv"
    result = infer(tiny_sample, tmp_path, [trained_run], "--answers", str(answers_path))
    info = pd.read_csv(tiny_sample / "eval" / "info.csv", dtype={"ImageID": str})
    written = pd.read_csv(tmp_path / "output.csv", dtype={"ImageID": str})
    assert list(written.columns) == ["ImageID", "ans"]
    assert written["ImageID"].tolist() == info["ImageID"].tolist()
    assert written["ans"].between(0, 17).all()
    probs = pd.read_csv(tmp_path / "output_probs.csv", dtype={"ImageID": str})
    assert probs["ImageID"].tolist() == info["ImageID"].tolist()
    assert np.allclose(probs[PROB_COLUMNS].sum(1), 1, atol=1e-4)
    # no --resize given: the checkpoint's 48x32 is used
    assert result["models"][0]["preprocess"].resize == (48, 32)
    assert result["caches"][0].shape == (len(info), 48, 32, 3)
    truth = pd.read_csv(answers_path, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    expected = f1_score(truth.loc[written["ImageID"]], written["ans"], average="macro")
    assert result["metrics"]["f1"] == pytest.approx(expected)
    assert result["metrics"]["confusion"].shape == (18, 18)
    printed = capsys.readouterr().out
    assert f"model: {trained_run / 'best.pth'}" in printed and "resize 48x32" in printed
    assert "macro F1" in printed and str(tmp_path / "output.csv") in printed.splitlines()[-1]


@pytest.mark.slow
def test_resize_override_warns(tiny_sample, trained_run, tmp_path, capsys):
    result = infer(tiny_sample, tmp_path, [trained_run], "--resize", "64", "48")
    assert result["caches"][0].shape[1:3] == (64, 48)
    assert "trained with resize 48x32" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_mode_gives_identical_outputs(tiny_sample, trained_run, tmp_path):
    (loaded,) = submission.load_models([trained_run / "best.pth"], say=lambda _: None)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in loaded.net.modules())
    info = dataset.parse_eval_dir(tiny_sample / "eval")
    (images,) = submission.build_image_caches([loaded], info["path"].tolist(), tmp_path)
    loaded.net.train()  # prediction must switch to eval itself
    runs = [submission.predict_model(loaded, images, device=torch.device("cpu"), batch_size=8,
                                    tta="flip") for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    assert not loaded.net.training


@pytest.mark.slow
def test_mismatched_answers_fail_before_work(tiny_sample, trained_run, tmp_path):
    answers = pd.read_csv(tiny_sample / "eval" / "answers.csv", dtype={"ImageID": str})
    answers.loc[0, "ImageID"] = "not-an-eval-image.jpg"
    bad = tmp_path / "bad_answers.csv"
    answers.to_csv(bad, index=False)
    with pytest.raises(UserError, match="not in info.csv"):
        infer(tiny_sample, tmp_path / "out", [trained_run], "--answers", str(bad))
    assert not (tmp_path / "out").exists()  # nothing decoded, nothing written


@pytest.mark.slow
def test_several_models_need_ensemble_and_calibration_is_found(tiny_sample, trained_run,
                                                               tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(trained_run, twin)
    with pytest.raises(UserError, match="add --ensemble"):
        infer(tiny_sample, tmp_path / "a", [trained_run, twin])
    plain = infer(tiny_sample, tmp_path / "a", [trained_run, twin], "--ensemble")
    offsets = [0.0] * 18
    offsets[5] = 50.0  # overwhelms every probability: all answers become class 5
    (twin / "calibration.json").write_text(json.dumps({"offsets": offsets}))
    calibrated = infer(tiny_sample, tmp_path / "b", [trained_run, twin], "--ensemble")
    assert "calibration: using" in capsys.readouterr().out
    assert set(calibrated["predictions"]["ans"]) == {5}
    assert np.allclose(calibrated["probs"], plain["probs"])  # the probs CSV stays uncalibrated
    off = infer(tiny_sample, tmp_path / "c", [trained_run, twin], "--ensemble", "--no_calibrate")
    assert off["predictions"]["ans"].tolist() == plain["predictions"]["ans"].tolist()


def test_fit_calibration_cli_writes_json(tmp_path, capsys):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 18, 200)
    probs = rng.dirichlet(np.ones(18), 200)
    probs[np.arange(200), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    oof = pd.DataFrame({"path": "x", "profile": "p", "fold": 0, "label": labels})
    oof = pd.concat([oof, pd.DataFrame(probs, columns=PROB_COLUMNS)], axis=1)
    oof.to_csv(tmp_path / "oof.csv", index=False)
    inference.main(inference.parse_args(["--fit_calibration", str(tmp_path)]))
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert len(saved["offsets"]) == 18 and saved["f1_after"] >= saved["f1_before"]
    assert "OOF macro F1" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_missing_run_folder_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_dir",
                           str(tmp_path / "nowhere"), "--data_dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nowhere" in lines[0]


@pytest.fixture(scope="module")
def category_runs(tiny_sample, tmp_path_factory, run_flags) -> dict[str, Path]:
    """One-epoch mask, gender and age (6 bins) models at different sizes."""
    tmp = tmp_path_factory.mktemp("category-runs")
    runs = {}
    for category, size, extra in (("mask", ["48", "32"], []), ("gender", ["64", "48"], []),
                                  ("age", ["48", "32"], ["--age_label_num", "6"])):
        args = config.parse_args(run_flags(tiny_sample / "train" / "images", tmp, "--epochs", "1",
                                          "--resize", *size, "--category", category,
                                          "--name", category, "--batch_size", "64",
                                          "--val_ratio", "0", *extra))
        runs[category] = Path(train.main(args)["run_dir"])
    return runs


@pytest.mark.slow
def test_category_trio_from_real_checkpoints(tiny_sample, category_runs, trained_run, tmp_path):
    trio = [category_runs[c] for c in ("mask", "gender", "age")]
    result = infer(tiny_sample, tmp_path / "trio", trio, "--ensemble")
    assert [m["category"] for m in result["models"]] == ["mask", "gender", "age"]
    heads = [submission.predict_model(m, images, device=torch.device("cpu"), batch_size=64)
             for m, images in zip(submission.load_models([r / "best.pth" for r in trio],
                                                        say=lambda _: None), result["caches"])]
    assert [h.shape[1] for h in heads] == [3, 2, 3]  # the 6 age bins come folded to 3 groups
    assert np.allclose(result["probs"], labels.heads_to_class_probs(*heads), atol=1e-6)
    # each eval photo decoded once into two sizes: two distinct caches for three models
    assert len({id(c) for c in result["caches"]}) == 2
    mixed = infer(tiny_sample, tmp_path / "mixed", [trained_run, *trio], "--ensemble")
    plain = infer(tiny_sample, tmp_path / "plain", [trained_run])
    assert np.allclose(mixed["probs"], (plain["probs"] + result["probs"]) / 2, atol=1e-6)
    with pytest.raises(UserError, match="none for age"):
        infer(tiny_sample, tmp_path / "partial", trio[:2], "--ensemble")
    assert not (tmp_path / "partial").exists()


# ---------------------------------------------------------------------------- bad input, early
def garbage_run(tmp_path: Path) -> Path:
    """A run folder whose best.pth cannot be read: any error other than its own proves that the
    check ran before a checkpoint was touched."""
    run = tmp_path / "garbage_run"
    run.mkdir()
    (run / "best.pth").write_bytes(b"not a checkpoint")
    return run


def cli(capsys, *argv) -> tuple[int, str]:
    """inference.py in-process as the command line runs it: (exit code, stderr)."""
    code = run_cli(inference.main, inference.parse_args, [str(a) for a in argv])
    return code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _header_only(eval_dir: Path) -> str:
    (eval_dir / "info.csv").write_text("ImageID,ans\n")
    return "info.csv"


def _empty_image_id(eval_dir: Path) -> str:
    header, rows = (eval_dir / "info.csv").read_text().split("\n", 1)
    (eval_dir / "info.csv").write_text(f"{header}\n,0\n{rows}")
    return "info.csv"


def _drop_first_image(eval_dir: Path) -> str:
    first = pd.read_csv(eval_dir / "info.csv", dtype={"ImageID": str})["ImageID"][0]
    (eval_dir / "images" / first).unlink()
    return first


def _not_an_image(eval_dir: Path) -> str:
    first = pd.read_csv(eval_dir / "info.csv", dtype={"ImageID": str})["ImageID"][0]
    (eval_dir / "images" / first).write_text("GIF89a, not a JPEG")
    return first


@pytest.mark.parametrize("spoil, message", [
    (_header_only, r"info\.csv: no rows"),
    (_empty_image_id, r"info\.csv: row 2 has no ImageID"),
    (_drop_first_image, "no image for ImageID"),
    (_not_an_image, "not a JPEG/PNG image"),
], ids=["header_only", "empty_image_id", "missing_image", "not_an_image"])
def test_bad_eval_layout_is_reported_before_any_checkpoint_is_read(tiny_sample, tmp_path, capsys,
                                                                    spoil, message):
    eval_dir = tmp_path / "eval"
    shutil.copytree(tiny_sample / "eval", eval_dir)
    named = spoil(eval_dir)
    out = tmp_path / "out"
    code, err = cli(capsys, "--model_dir", garbage_run(tmp_path), "--data_dir", eval_dir,
                    "--output_dir", out, "--cache_dir", out / "cache", "--device", "cpu")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err) and str(eval_dir) in err and named in err
    assert "not a readable checkpoint" not in err  # the layout came first
    assert not out.exists()


@pytest.mark.slow
def test_unknown_architecture_names_the_checkpoint_before_any_model_is_built(
        tiny_sample, trained_run, tmp_path, capsys):
    checkpoint = torch.load(trained_run / "best.pth", map_location="cpu", weights_only=False)
    checkpoint["model_config"]["name"] = "nonexistent_net"
    bad = tmp_path / "bad_run"
    bad.mkdir()
    torch.save(checkpoint, bad / "best.pth")
    for model_dirs, flags in (([bad], ()), ([trained_run, bad], ("--ensemble",))):
        with pytest.raises(UserError) as error:
            infer(tiny_sample, tmp_path / "out", model_dirs, *flags)
        assert str(error.value).startswith(f"{bad / 'best.pth'}: ")
        assert "unknown model 'nonexistent_net'" in str(error.value)
        assert "model:" not in capsys.readouterr().out  # the good model was not built first
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, flag_value, message", [
    (lambda o: (o / "output_probs.csv").mkdir(parents=True), "out",
     r"out/output_probs\.csv: is a folder; expected a file name"),
    (lambda o: (o / "output.csv").mkdir(parents=True), "out",
     r"out/output\.csv: is a folder; expected a file name"),
    (lambda o: o.write_text("a file"), "out", r"--output_dir .*out: is a file; expected a folder"),
    (lambda o: o.write_text("a file"), "out/sub", r"--output_dir .*out/sub: .*out is a file"),
], ids=["probs_csv_is_folder", "output_csv_is_folder", "output_dir_is_file", "under_a_file"])
def test_unwritable_outputs_fail_before_any_work(tiny_sample, tmp_path, capsys, make,
                                                 flag_value, message):
    out = tmp_path / "out"
    make(out)
    before = leftovers(out) if out.is_dir() else None
    code, err = cli(capsys, "--model_dir", garbage_run(tmp_path), "--data_dir",
                    tiny_sample / "eval", "--output_dir", tmp_path / flag_value,
                    "--cache_dir", tmp_path / "cache", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err) and "not a readable checkpoint" not in err
    if before is not None:
        assert leftovers(out) == before  # neither CSV, nor a temp file, was written
    assert not (tmp_path / "cache").exists()


def write_oof(run_dir: Path, rows: int = 60, seed: int = 4) -> Path:
    """An oof.csv as train.py writes it for a --category multi k-fold run."""
    rng = np.random.default_rng(seed)
    oof = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(rows)], "profile": "p", "fold": 0,
                        "label": rng.integers(0, 18, rows)})
    probs = pd.DataFrame(rng.dirichlet(np.ones(18), rows), columns=PROB_COLUMNS)
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([oof, probs], axis=1).to_csv(run_dir / "oof.csv", index=False)
    return run_dir / "oof.csv"


def _set_cell(column: str, value: str):
    def change(lines: list[str]) -> list[str]:
        header = lines[0].split(",")
        cells = lines[3].split(",")
        cells[header.index(column)] = value
        return lines[:3] + [",".join(cells)] + lines[4:]
    return change


@pytest.mark.parametrize("change, message", [
    (_set_cell("label", "99"), r"1 label value\(s\) not an integer 0\.\.17 \(first: line 4, "
                               r"label=99\)"),
    (_set_cell("label", ""), r"label value\(s\) not an integer 0\.\.17 \(first: line 4, "
                             r"label=empty\)"),
    (_set_cell("label", "mask"), r"label=.mask."),
    (_set_cell("p3", "abc"), r"p0\.\.p17 value\(s\) not a number in \[0, 1\] \(first: line 4, "
                             r"p3='abc'\)"),
    (_set_cell("p17", "inf"), r"not a number in \[0, 1\] \(first: line 4, p17="),
    (lambda lines: lines[:1], r"no rows"),
], ids=["label_99", "label_empty", "label_text", "p_text", "p_inf", "header_only"])
def test_fit_calibration_rejects_a_bad_oof_cell(tmp_path, capsys, change, message):
    oof_path = write_oof(tmp_path / "run")
    lines = oof_path.read_text().splitlines()
    oof_path.write_text("\n".join(change(lines)) + "\n")
    code, err = cli(capsys, "--fit_calibration", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {oof_path}: ") and re.search(message, err)
    assert leftovers(tmp_path / "run") == ["oof.csv"]  # no calibration.json, no temp file


def test_fit_calibration_paths_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "a" / "oof.csv").mkdir(parents=True)
    code, err = cli(capsys, "--fit_calibration", tmp_path / "a")
    assert code == 2 and "oof.csv: is a folder; expected a CSV file" in err
    write_oof(tmp_path / "b")
    (tmp_path / "b" / "calibration.json").mkdir()
    code, err = cli(capsys, "--fit_calibration", tmp_path / "b")
    assert code == 2 and "calibration.json: is a folder; expected a file name" in err
    assert "calibration:" not in capsys.readouterr().out  # refused before fitting


# ---------------------------------------------------------------------------- issue 15
@pytest.mark.slow
def test_answers_print_every_class_with_sklearns_scores(tiny_sample, trained_run, tmp_path, capsys):
    from sklearn.metrics import precision_recall_fscore_support
    answers_path = tiny_sample / "eval" / "answers.csv"
    result = infer(tiny_sample, tmp_path, [trained_run], "--answers", str(answers_path))
    written = pd.read_csv(tmp_path / "output.csv", dtype={"ImageID": str})
    truth = pd.read_csv(answers_path, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    _, _, f1, support = precision_recall_fscore_support(
        truth.loc[written["ImageID"]], written["ans"], labels=np.arange(18), zero_division=0)
    per_class = result["metrics"]["per_class"]
    assert [row["f1"] for row in per_class.values()] == pytest.approx(list(f1))
    assert [row["support"] for row in per_class.values()] == list(support)
    printed = capsys.readouterr().out
    table = printed[printed.index("per class"):printed.index("confusion matrix")]
    for name, row in per_class.items():  # one line per class: its name, then its four numbers
        line = next(line for line in table.splitlines() if line.startswith(name))
        assert line.split()[-1] == str(row["support"]) and f"{row['f1']:.4f}" in line


@pytest.mark.slow
def test_timm_model_mean_is_recorded_and_applied_by_inference(tiny_sample, tmp_path, run_flags,
                                                               capsys):
    import timm

    from maskface import augmentation, model as models
    # test_resnet's pretrained_cfg has mean = std = 0.5 (not ImageNet's) and bilinear resizing;
    # its "pretrained" weights: a state dict of a freshly built model (no network)
    weights = tmp_path / "test_resnet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    args = config.parse_args(run_flags(tiny_sample / "train" / "images", tmp_path, "--epochs", "1",
                                      "--model", "test_resnet", "--weights", str(weights),
                                      "--val_ratio", "0"))
    run_dir = Path(train.main(args)["run_dir"])
    assert "model preprocessing: mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5], bilinear resizing " \
           "from test_resnet's timm pretrained_cfg" in capsys.readouterr().out
    best = torch.load(run_dir / "best.pth", weights_only=False)
    assert best["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert best["preprocess"]["interpolation"] == "bilinear"
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["normalize"], saved["interpolation"], saved["resize"]) == ("model", "bilinear",
                                                                             [32, 24])
    result = infer(tiny_sample, tmp_path / "out", [run_dir])
    assert result["models"][0]["preprocess"].interpolation == "bilinear"
    # inference's probabilities are the network's on the photos normalized with mean/std 0.5
    net = models.restore_model(best)
    pixels = torch.from_numpy(np.array(result["caches"][0])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = net((pixels - 0.5) / 0.5).softmax(1).numpy()
        imagenet = augmentation.build_augmentation("BaseAugmentation").eval()(
            torch.from_numpy(np.array(result["caches"][0])))
        other = net(imagenet).softmax(1).numpy()
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)
    assert not np.allclose(result["probs"], other, atol=1e-3)  # the mean made a difference


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


# ---------------------------------------------------------------------------- issue 24
@pytest.mark.slow
def test_the_seed_notebook_pipeline_as_flags_is_what_inference_feeds_the_model(
        tiny_sample, tmp_path, run_flags):
    """CenterCrop(320, 256) -> Resize(224, 224) -> Normalize(mean, std), the seed team's notebook
    pipeline, as --crop_size, --resize, --interpolation bilinear, --mean and --std: recorded with
    the run and applied by inference to the eval photos."""
    from PIL import Image
    from torchvision import transforms

    from maskface import model as models
    mean, std = [0.548, 0.504, 0.479], [0.237, 0.247, 0.246]
    seed_flags = ["--crop_size", "320", "256", "--resize", "224", "224", "--interpolation",
                  "bilinear", "--mean", *map(str, mean), "--std", *map(str, std)]
    args = config.parse_args(run_flags(tiny_sample / "train" / "images", tmp_path, "--epochs", "1",
                                       "--val_ratio", "0", *seed_flags))
    run_dir = Path(train.main(args)["run_dir"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["crop_size"], saved["mean"], saved["std"]) == ([320, 256], mean, std)
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["normalize"] == {"mean": mean, "std": std}
    assert best["preprocess"]["crop_size"] == [320, 256]
    result = infer(tiny_sample, tmp_path / "out", [run_dir])
    info = pd.read_csv(tiny_sample / "eval" / "info.csv", dtype={"ImageID": str})
    notebook = transforms.Compose([transforms.CenterCrop((320, 256)),
                                   transforms.Resize((224, 224)), transforms.ToTensor(),
                                   transforms.Normalize(mean, std)])
    theirs = torch.stack([notebook(Image.open(tiny_sample / "eval" / "images" / image_id)
                                   .convert("RGB")) for image_id in info["ImageID"]])
    pixels = torch.from_numpy(np.array(result["caches"][0])).permute(0, 3, 1, 2).float() / 255
    ours = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    # one JPEG-decoder level (OpenCV's vs Pillow's) is 1/255/std, about 0.017
    assert (ours - theirs).abs().max() <= 2.5 / 255 / min(std)
    net = models.restore_model(best)
    with torch.no_grad():
        expected = net(ours).softmax(1).numpy()
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)


@pytest.mark.slow
def test_a_module_function_model_is_rebuilt_by_inference_from_another_folder(
        tiny_sample, tmp_path, run_flags, monkeypatch):
    from maskface import model as models
    example = Path(__file__).resolve().parents[1] / "examples" / "my_model.py"
    monkeypatch.chdir(example.parent)  # given relative: config.json records the file absolute
    args = config.parse_args(run_flags(tiny_sample / "train" / "images", tmp_path, "--epochs", "1",
                                       "--model", "my_model.py:build",
                                       "--model_args", '{"width": 8}'))
    run_dir = Path(train.main(args)["run_dir"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["model"], saved["model_args"]) == (f"{example}:build", '{"width": 8}')
    monkeypatch.chdir(tmp_path)
    result = infer(tiny_sample, tmp_path / "out", [run_dir])
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["model_config"]["model_args"] == {"width": 8}
    net = models.restore_model(best)
    pixels = torch.from_numpy(np.array(result["caches"][0])).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(best["normalize"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = net((pixels - mean) / std).softmax(1).numpy()
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)


def test_tta_takes_a_comma_list_of_registry_views(capsys):
    assert inference.parse_args(["--tta", "flip,scale"]).tta == "flip,scale"
    assert inference.parse_args([]).tta == "none"
    for bad in ("rotate", "flip,flip"):  # argparse's usage line, then the one error line
        with pytest.raises(SystemExit) as stop:
            inference.parse_args(["--tta", bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.strip().splitlines()[-1].endswith(
            f"--tta: '{bad}': expected none, or views separated by commas, each once, from "
            "flip, shift, scale")


@pytest.mark.slow
def test_tta_views_average_their_probabilities(tiny_sample, trained_run, tmp_path):
    plain = infer(tiny_sample, tmp_path / "a", [trained_run])["probs"]
    every = infer(tiny_sample, tmp_path / "b", [trained_run], "--tta", "flip,shift,scale")["probs"]
    np.testing.assert_allclose(every.sum(1), 1, atol=1e-6)
    assert not np.allclose(plain, every, atol=1e-4)  # the views were seen and averaged
