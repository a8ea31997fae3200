"""--amp / --channels_last: what auto decides (with the CPU's bf16 probes mocked), that the choice
is recorded in config.json and the checkpoints and followed by inference, and that a bf16 run and
its resume after SIGKILL are as exact as an fp32 one."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import inference
import train
from maskface import config, mixed_precision
from maskface.checkpoint import save_checkpoint
from maskface.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture()
def native_bf16(monkeypatch):
    """A CPU whose probes report AMX, as torch.cpu and oneDNN would on such a machine."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


@pytest.fixture()
def no_native_bf16(monkeypatch):
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


# ---------------------------------------------------------------------------- the decision
def test_auto_is_fp32_where_bf16_is_not_native(no_native_bf16):
    assert mixed_precision.cpu_bf16_unit() is None
    for model_name in ("resnet18", "BaseModel", "convnext_atto"):
        chosen = mixed_precision.choose_precision("auto", "auto", CPU, model_name)
        assert (chosen.autocast_dtype, chosen.channels_last) == (None, True)
        assert chosen.describe() == "fp32 + channels_last (auto: this CPU has no native bf16)"
    assert not mixed_precision.choose_precision("auto", "off", CPU, "resnet18").channels_last
    forced = mixed_precision.choose_precision("bf16", "auto", CPU, "resnet18")
    assert forced.autocast_dtype == torch.bfloat16 and forced.channels_last
    assert "emulated" in forced.describe()


def test_auto_is_bf16_and_channels_last_where_native_and_measured_to_pay(native_bf16):
    assert mixed_precision.cpu_bf16_unit() == "AMX"
    chosen = mixed_precision.choose_precision("auto", "auto", CPU, "resnet18")
    assert (chosen.amp, chosen.channels_last) == ("bf16", True)
    assert chosen.describe() == "bf16 autocast + channels_last (auto: AMX bf16 on this CPU)"
    assert not mixed_precision.choose_precision("auto", "off", CPU, "resnet18").channels_last
    # a family not measured to gain stays fp32; --amp off always wins
    assert mixed_precision.choose_precision("auto", "auto", CPU, "BaseModel").autocast_dtype is None
    off = mixed_precision.choose_precision("off", "off", CPU, "resnet18")
    assert (off.autocast_dtype, off.channels_last, off.amp) == (None, False, "off")
    assert mixed_precision.choose_precision("off", "auto", CPU, "resnet18").autocast_dtype is None


@pytest.mark.parametrize("broken", ["missing", "raising"])
def test_a_missing_or_failing_probe_means_fp32(monkeypatch, broken):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if broken == "missing":
            monkeypatch.delattr(torch.cpu, probe, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, probe, lambda: (_ for _ in ()).throw(RuntimeError()),
                                raising=False)
    assert mixed_precision.cpu_bf16_unit() is None
    assert mixed_precision.choose_precision("auto", "auto", CPU, "resnet18").autocast_dtype is None


def test_channels_last_flag_spellings_and_old_config_files(tmp_path):
    assert config.parse_args(["--channels_last"]).channels_last == "on"  # the old bare flag
    assert config.parse_args(["--channels-last", "off"]).channels_last == "off"
    assert config.parse_args([]).channels_last == "auto"
    for saved, expected in ((True, "on"), (False, "off"), ("auto", "auto")):
        path = tmp_path / f"{saved}.json"
        path.write_text(json.dumps({"channels_last": saved, "amp": "auto"}))
        assert config.parse_args(["--config", str(path)]).channels_last == expected
    path.write_text(json.dumps({"channels_last": "sideways"}))
    with pytest.raises(UserError, match="'channels_last' is \"sideways\"; expected true or false"):
        config.parse_args(["--config", str(path)])


# ---------------------------------------------------------------------------- the record
@pytest.mark.slow
def test_choice_round_trips_through_config_checkpoint_and_inference(
        tiny_sample, tmp_path, run_flags, native_bf16, monkeypatch, capsys):
    monkeypatch.setitem(mixed_precision.CPU_BF16_FAMILIES, "base", "a test's say-so")
    flags = run_flags(tiny_sample / "train" / "images", tmp_path, "--epochs", "1")
    run_dir = train.main(config.parse_args(flags))["run_dir"]
    assert "| bf16 autocast + channels_last (auto: AMX bf16 on this CPU)" in capsys.readouterr().out
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["amp"], saved["channels_last"]) == ("bf16", "on")
    for name in ("best.pth", "last.pth"):
        checkpoint = torch.load(run_dir / name, weights_only=False)
        assert checkpoint["precision"] == {"amp": "bf16", "channels_last": True}

    def infer(out: str, *extra: str) -> dict:
        return inference.main(inference.parse_args([
            "--model_dir", str(run_dir), "--data_dir", str(tiny_sample / "eval"),
            "--output_dir", str(tmp_path / out), "--cache_dir", str(tmp_path.parent / "shared-cache"),
            "--device", "cpu", *extra]))
    followed, fp32 = infer("a"), infer("b", "--amp", "off")
    assert "| bf16 autocast + channels_last" in capsys.readouterr().out
    # the probabilities differ, so the checkpoint's bf16 really ran (and --amp off did not)
    assert not np.allclose(followed["probs"], fp32["probs"], atol=1e-6)
    assert np.allclose(followed["probs"], fp32["probs"], atol=0.05)


@pytest.mark.slow
def test_a_run_folder_of_before_the_record_resumes_in_fp32(tiny_train_dir, tmp_path, run_flags,
                                                           native_bf16, monkeypatch):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "1",
                                                    "--amp", "off", "--channels_last", "off")))[
        "run_dir"]
    # as older versions wrote it: "auto" (fp32 on a CPU then), a boolean, no 'precision' key
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "amp": "auto",
                                                     "channels_last": False}))
    last = torch.load(run_dir / "last.pth", weights_only=False)
    del last["precision"]
    last["config"].update(amp="auto", channels_last=False)
    save_checkpoint(last, run_dir / "last.pth")
    monkeypatch.setitem(mixed_precision.CPU_BF16_FAMILIES, "base", "a test's say-so")  # auto would be bf16
    train.main(config.parse_args(["--resume", str(run_dir), "--epochs", "2"]))
    resumed = torch.load(run_dir / "last.pth", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["precision"] == {"amp": "off", "channels_last": False}


@pytest.mark.slow
def test_bf16_resume_after_sigkill_matches_uninterrupted_and_keeps_its_precision(
        tiny_train_dir, tmp_path, run_flags, run_killed_after_first_epoch):
    common = [sys.executable, "train.py", *run_flags(tiny_train_dir, tmp_path, "--epochs", "2",
                                                      "--early_stopping_patience", "0",
                                                      "--amp", "bf16", "--channels_last")]
    subprocess.run(common + ["--name", "whole"], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    killed_dir = tmp_path / "runs" / "killed"
    run_killed_after_first_epoch(common + ["--name", "killed"], killed_dir)
    assert len((killed_dir / "summary.csv").read_text().splitlines()) < 3, "finished unkilled"
    config_before = (killed_dir / "config.json").read_text()
    with pytest.raises(UserError, match=re.escape('--amp "off" differs from the run\'s "bf16"')):
        train.main(config.parse_args(["--resume", str(killed_dir), "--amp", "off"]))
    assert (killed_dir / "config.json").read_text() == config_before
    subprocess.run([sys.executable, "train.py", "--resume", str(killed_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    whole = torch.load(tmp_path / "runs" / "whole" / "last.pth", weights_only=False)
    resumed = torch.load(killed_dir / "last.pth", weights_only=False)
    assert resumed["epoch"] == whole["epoch"] == 2
    assert resumed["precision"] == whole["precision"] == {"amp": "bf16", "channels_last": True}
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
