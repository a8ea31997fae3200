"""maskface.cli: an OSError under run_cli is one line naming the file, exit code 2, no
traceback; an unknown flag is one line naming it and the nearest flags."""
import pytest

from maskface.cli import FlagParser, run_cli


def test_os_errors_become_one_line(tmp_path, capsys):
    def main(_):
        open(tmp_path)  # a folder: IsADirectoryError
    assert run_cli(main, lambda argv: None, []) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: Is a directory"


def flag_parser() -> FlagParser:
    parser = FlagParser(prog="train.py")
    for flag in ("--lr", "--lr_decay_step", "--batch_size"):
        parser.add_argument(flag)
    return parser


@pytest.mark.parametrize("argv, expected", [
    (["--lrr", "0.1"], "error: unknown flag --lrr; nearest: --lr"),
    (["--lr-decay-stepp=3"], "error: unknown flag --lr-decay-stepp; nearest: --lr_decay_step"),
    (["--zzz", "--yyy"], "error: unknown flag --zzz (and 1 more unknown); train.py --help lists "
                         "them"),
    (["stray"], "error: unrecognized arguments: stray"),
])
def test_an_unknown_flag_is_one_line_with_the_nearest_names(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        flag_parser().parse_args(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == expected


def test_hyphens_still_spell_a_flag():
    assert flag_parser().parse_args(["--lr-decay-step", "3", "--batch-size=2"]).lr_decay_step == "3"


def test_train_pys_unknown_flag_names_its_neighbours(capsys):
    from maskface import config
    with pytest.raises(SystemExit) as done:
        config.parse_args(["--lrr", "0.1"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "error: unknown flag --lrr; nearest: --lr, --maxlr, --min_lr"
