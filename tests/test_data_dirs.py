"""maskface.data_dirs: the bundled sample is generated once and reused."""
from maskface.data_dirs import ensure_sample
from maskface.sample import MARKER, generate_sample


def test_ensure_sample_reuses_existing(tmp_path):
    root = generate_sample(tmp_path / "root", 2, 1, seed=0)
    marker = (root / MARKER).read_text()
    train_dir, eval_dir = ensure_sample(root)  # must not regenerate the 220-person default
    assert (train_dir, eval_dir) == (root / "train" / "images", root / "eval")
    assert len(list(train_dir.iterdir())) == 2 and (root / MARKER).read_text() == marker
