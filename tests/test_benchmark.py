"""benchmark.py, the script: its smoke run's headline, side-by-side failures, and flags checked
before any work."""
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bench import HEADLINE  # the headline's format, tested there

import benchmark
from maskface.bench import speed, timing
from maskface.cli import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_smoke_run_reports_the_headline_figures(tiny_train_dir, tmp_path, capsys):
    table = tmp_path / "out" / "table.md"
    cache_root = tmp_path / "cache"
    results = benchmark.main(benchmark.parse_args([
        "--smoke", "--data_dir", str(tiny_train_dir), "--resize", "64", "48", "--batch_size", "16",
        "--device", "cpu", "--cache_dir", str(cache_root), "--output", str(table),
        "--side_by_side", "2", "--compare_augmentation", str(EXAMPLES / "strong_aug.json"),
        "ErasingAugmentation", "--augment_workers", "1"]))
    for figure in (results["data_path_ratio"], results["train_loop_percent"]):
        assert isinstance(figure, float) and figure > 0
    rates = [results["data_path"]["reference"], results["data_path"]["toolkit"],
             results["train"]["ceiling"], results["train"]["loop"],
             results["inference"]["plain"], results["inference"]["flip"]]
    assert all(r["images_per_s"] > 0 and r["images"] == benchmark.SMOKE_BATCHES * 16 for r in rates)
    assert results["cache"]["images"] == 24 * 7 and results["cache"]["mb"] > 0
    assert results["memory"]["process"] > 0
    one, two = results["side_by_side"]
    assert (one["processes"], two["processes"]) == (1, 2) and one["ratio"] == 1.0
    assert one["images"] == benchmark.SMOKE_BATCHES * 16 and two["images"] == 2 * one["images"]
    assert two["images_per_s"] > 0 and two["threads_each"] == max(1, one["threads_each"] // 2)

    printed = capsys.readouterr().out.strip().splitlines()
    assert HEADLINE.match(printed[-1]), printed[-1]
    assert printed[-1] == results["headline"]
    written = table.read_text()
    assert written == results["table"] and "| measurement |" in written and "BaseModel 64x48" in written
    assert "| side by side: 2 training processes at once" in written
    # the user pipeline's data path and loop, next to a batched preset, from the same run
    pipeline, erasing = results["augmentations"]
    assert pipeline["how"] == "per image in 1 worker process(es)"
    assert erasing["how"] == "batched on the device"
    for row in (pipeline, erasing):
        assert row["path"]["images_per_s"] > 0 and row["loop"] > 0
        assert f"| data path: toolkit, {row['value']} ({row['how']}) |" in written
        assert f"| train step: toolkit loop with {row['value']} |" in written
    assert not list(table.parent.glob(".*"))  # the atomic write left no temp file behind
    assert not any(cache_root.iterdir())  # the cold cache is removed afterwards


@pytest.mark.slow
def test_side_by_side_failure_is_one_user_error_not_a_hang(tiny_train_dir, tmp_path):
    settings = speed.train_settings(benchmark.parse_args(["--resize", "32", "24"]),
                                        torch.device("cpu"))
    missing = tmp_path / "no-such-cache.npy"
    with pytest.raises(UserError, match="side-by-side run of 1 process.*no-such-cache.npy"):
        timing.measure_side_by_side(settings, missing, np.zeros(10, dtype=int), counts=[2],
                                       batches=1)


def test_unknown_model_is_a_user_error_before_any_work(tiny_train_dir, tmp_path):
    with pytest.raises(UserError, match="resnet1800"):
        benchmark.main(benchmark.parse_args(["--model", "resnet1800", "--data_dir",
                                             str(tiny_train_dir), "--cache_dir", str(tmp_path)]))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--compare_augmentation", "{tmp}/adir/aug.json"], "--augmentation .*aug.json: file not found"),
    (["--compare_augmentation", f"{EXAMPLES}/strong_aug.py:nothing"], "has no function 'nothing'"),
    (["--compare_augmentation", "StrongAugmentaton"], "unknown augmentation 'StrongAugmentaton'"),
    (["--output", "{tmp}/adir"], "--output .*adir: is a folder"),
    (["--output", "{tmp}/afile/table.md"], "--output .*afile/table.md: .*afile is a file"),
    (["--cache_dir", "{tmp}/afile"], "--cache_dir .*afile: is a file; expected a folder"),
    (["--cache_dir", "{tmp}/afile/cache"], "--cache_dir .*afile is a file"),
])
def test_output_paths_of_the_wrong_kind_fail_before_any_work(tiny_train_dir, tmp_path, monkeypatch,
                                                             flags, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started before its output paths were checked")

    monkeypatch.setattr(speed, "measure_cache", no_work)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    argv = ["--smoke", "--resize", "32", "24", "--data_dir", str(tiny_train_dir), "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(UserError, match=message):
        benchmark.main(benchmark.parse_args(argv + [f.format(tmp=tmp_path) for f in flags]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no cache, no output
    assert not any((tmp_path / "adir").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--end_to_end", "--peer_timm", "{tmp}/no/train.py"],
     r"^--peer_timm .*no/train.py: no such file; expected timm's train.py"),
    (["--end_to_end", "--peer_timm", "{tmp}/afile"], r"^--peer_timm .*afile: expected a Python"),
    (["--peer_timm", "{tmp}/train.py"], r"^--peer_timm .*train.py: only with --end_to_end"),
    (["--end_to_end", "--peer_timm", "{tmp}/train.py", "--model", "BaseModel"],
     r"^--model BaseModel: --peer_timm needs a model timm's train.py knows"),
    (["--end_to_end", "--peer_workers", "-1"], r"^--peer_workers -1: expected 0 or more"),
])
def test_peer_flags_are_checked_before_any_work(tiny_sample, tmp_path, monkeypatch, flags,
                                                message):
    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started before --peer_timm was checked")

    monkeypatch.setattr(speed, "end_to_end_main", no_work)
    monkeypatch.setattr(speed, "measure_cache", no_work)
    (tmp_path / "afile").write_text("not a script")
    (tmp_path / "train.py").write_text("")
    argv = ["--data_dir", str(tiny_sample / "train" / "images"), "--eval_dir",
            str(tiny_sample / "eval"), "--device", "cpu", "--model", "resnet18",
            "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(UserError, match=message) as raised:
        benchmark.main(benchmark.parse_args(argv + [f.format(tmp=tmp_path) for f in flags]))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()
