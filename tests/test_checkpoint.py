"""maskface.checkpoint: a saved checkpoint reads back whole, a torn or foreign one is named, one
that would run code is refused and runs nothing; what training saves loads with weights_only=True."""
from pathlib import Path

import pytest
import torch

import inference
import train
from maskface import config, model as models
from maskface.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from maskface.cli import UserError, run_cli


# ---------------------------------------------------------------------------- 2. loading runs no code
class WritesAFile:
    """A pickle payload: unpickling it would call open(...)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "pwned"
    net = models.build_model("BaseModel", 18)
    evil = {"model_config": net.model_config, "model": net.state_dict(), "preprocess": {},
            "normalize": {}, "category": "multi", "payload": WritesAFile(target)}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(evil, run_dir / "best.pth")
    with pytest.raises(UserError, match=r"best\.pth: refused: it holds an object \(.*open.*\) "
                                        r"that loading would have to run code for"):
        load_checkpoint(run_dir / "best.pth")
    code = run_cli(inference.main, inference.parse_args, ["--model_dir", str(run_dir),
                                                         "--output_dir", str(tmp_path / "out")])
    assert code == 2 and not target.exists() and not (tmp_path / "out").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_checkpoints_hold_only_what_weights_only_loading_takes(tiny_train_dir, tmp_path, run_flags):
    run_dir = train.main(config.parse_args(run_flags(tiny_train_dir, tmp_path, "--epochs", "1")))["run_dir"]
    for name in ("best.pth", "last.pth"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run_dir / name) == []


def test_a_saved_checkpoint_reads_back_and_a_torn_or_foreign_one_is_named(tmp_path):
    net = models.build_model("BaseModel", 18)
    state = {"model_config": net.model_config, "model": net.state_dict(), "preprocess": {},
             "normalize": {}, "category": "multi"}
    path = tmp_path / "best.pth"
    save_checkpoint(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]  # no temp file left beside it
    loaded = read_checkpoint(path)
    assert loaded["model_config"] == net.model_config
    assert all(torch.equal(loaded["model"][k], v) for k, v in net.state_dict().items())
    torn = tmp_path / "torn.pth"
    torn.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=r"torn\.pth: not a readable checkpoint"):
        load_checkpoint(torn)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": net.state_dict()}, foreign)
    with pytest.raises(UserError, match=r"foreign\.pth: not a train\.py checkpoint \(missing "
                                        r"model_config, model, preprocess, normalize, category\)"):
        read_checkpoint(foreign)
