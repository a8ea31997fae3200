"""maskface.cli: an OSError under run_cli is one line naming the file, exit code 2, no
traceback."""
from maskface.cli import run_cli


def test_os_errors_become_one_line(tmp_path, capsys):
    def main(_):
        open(tmp_path)  # a folder: IsADirectoryError
    assert run_cli(main, lambda argv: None, []) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: Is a directory"
