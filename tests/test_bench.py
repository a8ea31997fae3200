"""maskface.bench: the headline's format (speed), the usual pipeline's batches and shuffling
against the toolkit's (usual_pipeline), ceilings and loops in both precisions (timing), two
whole jobs timed (end_to_end), timm's train.py as the peer job (timm_peer, with a stand-in
script in tests/peers)."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark
from maskface import augmentation, dataset, image_cache
from maskface.bench import speed, timing, timm_peer, usual_pipeline
from maskface.cli import UserError

HEADLINE = re.compile(r"^data path ratio: \d+\.\dx; train loop / ceiling: \d+%$")


def test_headline_format_rounds_as_documented():
    line = speed.headline({"data_path": {"ratio_base": 12.345}, "train": {"percent": 84.6}})
    assert line == "data path ratio: 12.3x; train loop / ceiling: 85%"
    assert HEADLINE.match(line)


@pytest.mark.parametrize("crop, preset", [("none", "BaseAugmentation"),
                                          ("center", "CustomAugmentation")])
def test_reference_and_toolkit_batches_match(tiny_train_dir, tmp_path, crop, preset):
    frame = dataset.add_labels(dataset.parse_train_dir(tiny_train_dir))
    paths, labels = frame["path"].tolist()[:16], frame["label"].to_numpy()[:16]
    images = image_cache.build_cache(paths, image_cache.Preprocess((64, 48), crop=crop), tmp_path,
                                     progress=False)
    reference, reference_labels = next(iter(usual_pipeline.reference_loader(
        paths, labels, resize=(64, 48), batch_size=16, workers=0, n_images=16,
        center_crop=crop == "center", shuffle=False)))
    uint8_images, toolkit_labels, _ = next(iter(timing.toolkit_batches(
        images, labels, 16, 16, "cpu", shuffle=False)))
    toolkit = augmentation.build_augmentation(preset).train()(uint8_images)

    assert reference.shape == toolkit.shape == (16, 3, 64, 48)
    assert reference.dtype == toolkit.dtype == torch.float32
    assert torch.equal(reference_labels, toolkit_labels)
    if preset == "BaseAugmentation":  # nothing random: the same photos, resized alike
        # PIL's bilinear and OpenCV's area resize differ by about a grey level per pixel
        assert (reference - toolkit).abs().mean() < 0.05
        # and the comparison can fail: the same batch in another order is far off
        assert (reference - toolkit.flip(0)).abs().mean() > 0.5


def test_reference_and_toolkit_shuffle_alike_for_the_same_seed(tiny_train_dir, tmp_path):
    frame = dataset.add_labels(dataset.parse_train_dir(tiny_train_dir))
    paths, labels = frame["path"].tolist()[:24], frame["label"].to_numpy()[:24]
    images = image_cache.build_cache(paths, image_cache.Preprocess((32, 24), crop="none"), tmp_path,
                                     progress=False)
    reference = usual_pipeline.reference_loader(paths, labels, resize=(32, 24), batch_size=8,
                                           workers=0, n_images=24, seed=7)
    torch.manual_seed(7)
    # drawn before the DataLoader starts, which takes a base seed from torch's global RNG
    toolkit = list(timing.toolkit_batches(images, labels, 24, 8, "cpu", shuffle=True))
    augment = augmentation.build_augmentation("BaseAugmentation").train()
    shuffled = False
    for (ref_images, ref_labels), (uint8_images, toolkit_labels, rows) in zip(reference, toolkit):
        assert torch.equal(ref_labels, toolkit_labels)
        assert (ref_images - augment(uint8_images)).abs().mean() < 0.05
        shuffled |= not np.array_equal(rows, np.sort(rows))
    assert shuffled  # the order really was drawn, not the identity


def test_reference_loader_draws_more_than_one_epoch(tiny_train_dir):
    frame = dataset.parse_train_dir(tiny_train_dir)
    paths = frame["path"].tolist()[:10]
    loader = usual_pipeline.reference_loader(paths, [0] * 10, resize=(32, 24), batch_size=8,
                                        workers=0, n_images=24)
    assert [len(images) for images, _ in loader] == [8, 8, 8]


@pytest.mark.slow
def test_ceilings_and_loops_in_fp32_and_the_chosen_precision_side_by_side(tiny_train_dir,
                                                                          tmp_path):
    frame = dataset.add_labels(dataset.parse_train_dir(tiny_train_dir))
    images = image_cache.build_cache(frame["path"].tolist()[:16], image_cache.Preprocess((32, 24)),
                                     tmp_path, progress=False)
    targets = frame["label"].to_numpy()[:16]
    settings = speed.train_settings(benchmark.parse_args(
        ["--resize", "32", "24", "--batch_size", "8", "--amp", "bf16"]), torch.device("cpu"))
    measured = timing.measure_precisions(settings, images, targets, device=torch.device("cpu"),
                                            batches=1, repeats=1)
    fp32, chosen = measured["fp32"], measured["chosen"]
    assert fp32 is not chosen and measured["compiled"] is None
    assert (fp32["precision"].amp, chosen["precision"].amp) == ("off", "bf16")
    first_conv = next(m for m in chosen["model"].modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    rows = speed.train_rows({"train_fp32": fp32, "train": chosen, "train_compiled": None},
                                "cpu")
    assert len(rows) == 4 and "ceiling, fp32 (" in rows[0] and "1.00x fp32" in rows[0]
    assert "ceiling, chosen = bf16 autocast + channels_last (" in rows[1]
    assert "loop, fp32 (" in rows[2] and "% of its ceiling" in rows[3]
    # where the chosen precision is fp32 itself, it is measured once and named with why
    auto = speed.train_settings(benchmark.parse_args(
        ["--resize", "32", "24", "--batch_size", "8", "--amp", "off", "--channels_last", "off"]),
        torch.device("cpu"))
    once = timing.measure_precisions(auto, images, targets, device=torch.device("cpu"),
                                        batches=1, repeats=1)
    assert once["fp32"] is once["chosen"]


@pytest.mark.slow
def test_end_to_end_times_both_whole_jobs(tiny_sample, tmp_path, capsys):
    results = benchmark.main(benchmark.parse_args([
        "--end_to_end", "--data_dir", str(tiny_sample / "train" / "images"),
        "--eval_dir", str(tiny_sample / "eval"), "--resize", "32", "24", "--epochs", "1",
        "--batch_size", "16", "--device", "cpu", "--workers", "0",
        "--cache_dir", str(tmp_path / "scratch"), "--output", str(tmp_path / "e2e.md")]))
    toolkit, usual = results["toolkit"], results["usual"]
    assert toolkit["seconds"] > 0 and usual["seconds"] > 0
    assert results["ratio"] == pytest.approx(usual["seconds"] / toolkit["seconds"])
    # both jobs really trained and predicted the 4 eval people's photos
    assert 0 <= toolkit["best_f1"] <= 1 and 0 <= toolkit["eval_f1"] <= 1
    assert 0 <= usual["best_f1"] <= 1 and 0 <= usual["eval_f1"] <= 1
    assert len(usual["predictions"]) == results["n_eval"] == 4 * 7
    assert toolkit["precision"].startswith("fp32") or "autocast" in toolkit["precision"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"^end to end: toolkit \d+\.\d\dx faster than the usual pipeline$", printed[-1])
    assert (tmp_path / "e2e.md").read_text() == results["table"]
    assert not any((tmp_path / "scratch").iterdir())  # the scratch runs and caches are removed


FAKE_PEER = Path(__file__).resolve().parent / "peers" / "fake_timm_train.py"


def test_the_peer_sees_our_split_in_every_class_folder_with_a_fixed_class_map(tmp_path):
    photos = tmp_path / "photos"
    paths = []
    for person in ("001_female_Asian_45", "002_male_Asian_20"):
        (photos / person).mkdir(parents=True)
        for stem in ("mask1", "normal"):
            (photos / person / f"{stem}.jpg").write_bytes(b"\xff\xd8\xff")
            paths.append(str(photos / person / f"{stem}.jpg"))
    labels = np.array([4, 16, 0, 12])
    class_map = timm_peer.build_image_folder(tmp_path / "view", paths, labels,
                                             {"train": np.array([0, 1]),
                                              "validation": np.array([2, 3])})
    names = class_map.read_text().split()
    assert names == [f"{k:02d}" for k in range(18)]  # line k is class k: timm's index
    for split in ("train", "validation"):  # every class folder, even the empty ones
        assert sorted(p.name for p in (tmp_path / "view" / split).iterdir()) == names
    linked = tmp_path / "view" / "train" / "16" / "001_female_Asian_45_normal.jpg"
    assert linked.is_symlink() and linked.resolve() == Path(paths[1]).resolve()
    assert (tmp_path / "view" / "validation" / "00" / "002_male_Asian_20_mask1.jpg").is_symlink()
    assert sum(1 for _ in (tmp_path / "view").rglob("*.jpg")) == 4


def test_the_peer_gets_the_jobs_settings_and_timms_defaults_otherwise(tmp_path):
    job = {"model": "resnet18", "resize": [128, 96], "epochs": 4, "optimizer": "adam",
           "lr": 1e-3, "batch_size": 32, "peer_workers": 4, "device": "cpu"}
    flags = timm_peer.peer_flags(job, tmp_path / "data", tmp_path / "map.txt", tmp_path / "out")
    text = " ".join(flags)
    for expected in ("--model resnet18", "--num-classes 18", "--input-size 3 128 96",
                     "--epochs 4", "--opt adam", "--lr 0.001", "-b 32", "--workers 4",
                     "--device cpu", "--train-split train --val-split validation"):
        assert expected in text
    assert "--sched" not in text and "--warmup-epochs" not in text  # timm's own defaults


class NotAllowed:
    """A class no weights_only load accepts (module level, so that torch.save can pickle it)."""


def test_a_checkpoint_that_needs_more_than_weights_only_is_one_user_error(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    torch.save({"arch": "resnet18", "args": NotAllowed()}, path)
    with pytest.raises(UserError, match=r"model_best.pth.tar: not a timm train.py checkpoint"):
        timm_peer.load_peer_checkpoint(path)


@pytest.mark.slow
def test_end_to_end_against_a_peer_script_times_both_jobs_and_the_phases(tiny_sample, tmp_path,
                                                                         capsys):
    results = benchmark.main(benchmark.parse_args([
        "--end_to_end", "--peer_timm", str(FAKE_PEER), "--peer_workers", "1",
        "--data_dir", str(tiny_sample / "train" / "images"), "--model", "resnet18",
        "--eval_dir", str(tiny_sample / "eval"), "--resize", "32", "24", "--epochs", "1",
        "--batch_size", "16", "--device", "cpu", "--cache_dir", str(tmp_path / "scratch"),
        "--output", str(tmp_path / "e2e.md")]))
    toolkit, peer = results["toolkit"], results["peer"]
    assert "usual" not in results
    assert results["ratio"] == pytest.approx(peer["wall_s"] / toolkit["seconds"])
    assert len(peer["predictions"]) == results["n_eval"] == 4 * 7
    assert 0 <= peer["eval_f1"] <= 1 and 0 <= toolkit["eval_f1"] <= 1
    assert peer["train"]["cpu_s"] > 0 and peer["predict"]["cpu_s"] > 0
    assert toolkit["cpu_s"] > 0
    # each script wrote its phases: the startup, the cache, the epoch, the prediction
    scripts = [p["script"] for p in toolkit["profiles"]]
    assert scripts == ["train.py", "inference.py"]
    train_phases = {r["phase"] for r in toolkit["profiles"][0]["phases"]}
    assert {"startup", "records", "cache", "train", "validate", "save"} <= train_phases
    assert {"startup", "cache", "predict"} <= {r["phase"] for r in toolkit["profiles"][1]["phases"]}
    table = results["table"]
    assert "| toolkit train.py: training epochs |" in table
    assert "| timm train.py: whole process" in table
    assert (tmp_path / "e2e.md").read_text() == table
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"^end to end: toolkit \d+\.\d\dx faster than timm train.py$", printed[-1])
    assert not any((tmp_path / "scratch").iterdir())


@pytest.mark.slow
def test_a_failing_peer_is_one_user_error_naming_it(tiny_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PEER_FAIL", "1")
    with pytest.raises(UserError, match=r"--peer_timm .*fake_timm_train.py: exited with 1 "
                                        r"\(fake peer: told to fail\)"):
        benchmark.main(benchmark.parse_args([
            "--end_to_end", "--peer_timm", str(FAKE_PEER), "--model", "resnet18",
            "--data_dir", str(tiny_sample / "train" / "images"),
            "--eval_dir", str(tiny_sample / "eval"), "--resize", "32", "24", "--epochs", "1",
            "--batch_size", "16", "--device", "cpu", "--cache_dir", str(tmp_path / "scratch")]))
    assert not any((tmp_path / "scratch").iterdir())
