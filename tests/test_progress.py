"""maskface.progress: what a run shows while it trains. The ETA arithmetic on a fake clock (no ETA
before two timed steps, the epochs of this fold and of the folds after it, the measured
validation time, early stopping), the line rule (every --log_interval steps or --log_seconds),
the validation lines, auto's choice of bar or lines and the bar naming the fold."""
import io
import re

import pytest
import torch

from maskface.progress import ModelWork, Reporter, RunClock, choose_mode, duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


LINE = re.compile(r"^(?:fold (\d+)/(\d+) )?epoch (\d+)/(\d+) step (\d+)/(\d+): loss (\d+\.\d{4}), "
                  r"lr (\S+), (\d+) img/s, epoch ETA (\?|\d+:\d\d(?::\d\d)?), "
                  r"run ETA (\?|\d+:\d\d(?::\d\d)?)$")


def seconds(text: str) -> int | None:
    if text == "?":
        return None
    parts = [int(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def three_folds(epochs: int = 2) -> list[ModelWork]:
    # 100 training photos (10 steps of 10) and 20 validation photos per epoch and fold
    return [ModelWork(fold, 100, 20, epochs) for fold in range(3)]


def steps(observer, clock: FakeClock, first: int, last: int, seconds_each: float = 1.0,
          loss=2.0, images: int = 10) -> None:
    for step in range(first, last + 1):
        clock.advance(seconds_each)
        observer(step, images, loss, 1e-3)


def test_no_eta_before_two_steps_are_timed():
    clock = FakeClock()
    run = RunClock(three_folds(), clock)
    run.start_model(0, 2)
    run.start_epoch(10)
    for step in (1, 2):  # the first step is never timed
        clock.advance(5.0)
        run.record_step(step, 10)
        assert run.epoch_eta() is None and run.run_eta() is None
    clock.advance(1.0)
    run.record_step(3, 10)
    assert run.epoch_eta() is not None


def test_run_eta_counts_this_folds_epochs_and_every_fold_after_it():
    clock = FakeClock()
    run = RunClock(three_folds(epochs=2), clock)
    run.start_model(0, 2)
    run.start_epoch(10)
    clock.advance(30.0)  # the first step's warm-up, not timed
    run.record_step(1, 10)
    for step in (2, 3):
        clock.advance(1.0)  # 10 photos a second: 0.1 s a photo
        run.record_step(step, 10)
    assert run.seconds_per_image == pytest.approx(0.1)
    # this epoch: 70 photos left (7 s) + its validation at the training speed (20 x 0.1 = 2 s)
    assert run.epoch_eta() == pytest.approx(9.0)
    # + fold 0's second epoch (10 + 2 s) + 2 folds x 2 epochs x 12 s
    assert run.run_eta() == pytest.approx(9.0 + 12.0 + 48.0)


def test_the_measured_validation_time_replaces_the_estimate():
    clock = FakeClock()
    run = RunClock(three_folds(epochs=2), clock)
    run.start_model(0, 2)
    run.start_epoch(10)
    for step in range(1, 11):
        clock.advance(1.0)
        run.record_step(step, 10)
    clock.advance(0.5)  # validation partly done: 2 s estimated, 0.5 s gone
    assert run.epoch_eta() == pytest.approx(1.5)
    clock.advance(4.5)  # validation and checkpoint took 5 s
    run.end_epoch()
    run.start_epoch(10)
    clock.advance(1.0)
    run.record_step(1, 10)
    # 90 photos at 0.1 s + the measured 5 s; then 2 more folds x 2 epochs x (10 + 5 s)
    assert run.epoch_eta() == pytest.approx(14.0)
    assert run.run_eta() == pytest.approx(14.0 + 60.0)


def test_early_stopping_leaves_only_the_later_folds_and_a_resume_its_own_epochs():
    clock = FakeClock()
    run = RunClock(three_folds(epochs=4), clock)
    run.start_model(0, 4)
    run.start_epoch(10)
    steps(lambda step, images, *_: run.record_step(step, images), clock, 1, 10)
    run.end_epoch()
    run.end_model()  # early stopping after one epoch of four
    run.start_model(1, 1)  # fold 1 resumed with one epoch left
    run.start_epoch(10)
    steps(lambda step, images, *_: run.record_step(step, images), clock, 1, 5)
    epoch = run.epoch_eta()
    # fold 1 has nothing after this epoch; fold 2 its 4 epochs of 100 photos + the 0 s tail
    assert run.run_eta() == pytest.approx(epoch + 4 * 10.0)


def test_lines_every_log_interval_steps_or_sooner_after_log_seconds():
    clock, out = FakeClock(), Stream(terminal=False)
    reporter = Reporter("auto", epochs=2, log_interval=4, log_seconds=30, stdout=out,
                        stderr=Stream(terminal=False), clock=clock)
    assert reporter.mode == "lines"
    reporter.plan(three_folds(epochs=2), n_folds=3)
    reporter.start_model(0, 0)
    observer = reporter.epoch(0, 10)
    steps(observer, clock, 1, 8, loss=torch.tensor(2.0))  # lines after steps 4 and 8
    steps(observer, clock, 9, 9, seconds_each=31.0, loss=torch.tensor(2.0))  # 31 s: due
    steps(observer, clock, 10, 10, loss=torch.tensor(2.0))
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(5)) for m in parsed] == [4, 8, 9]
    first = parsed[0]
    assert (first.group(1), first.group(2), first.group(3), first.group(4)) == ("0", "3", "1", "2")
    assert first.group(6) == "10" and first.group(7) == "2.0000" and float(first.group(8)) == 1e-3
    assert int(first.group(9)) == 10  # 40 photos in 4 s
    assert seconds(first.group(11)) >= seconds(first.group(10)) > 0


def test_the_loss_of_a_line_is_the_mean_since_the_last_line():
    clock, out = FakeClock(), Stream(terminal=False)
    reporter = Reporter("lines", epochs=1, log_interval=2, log_seconds=0, stdout=out, clock=clock)
    reporter.plan([ModelWork(None, 40, 0, 1)])
    reporter.start_model(None, 0)
    observer = reporter.epoch(0, 4)
    for step, loss in enumerate((1.0, 3.0, 5.0, 7.0), start=1):
        clock.advance(1.0)
        observer(step, 10, torch.tensor(loss), 0.1)
    losses = [float(LINE.match(line).group(7)) for line in out.getvalue().splitlines()]
    assert losses == [2.0, 6.0]
    assert not out.getvalue().startswith("fold")  # a single run names no fold


def test_a_long_validation_prints_lines_and_a_short_one_none():
    clock, out = FakeClock(), Stream(terminal=False)
    reporter = Reporter("lines", epochs=1, log_interval=100, log_seconds=30, stdout=out,
                        clock=clock)
    reporter.plan([ModelWork(None, 100, 300, 1)])
    reporter.start_model(None, 0)
    reporter.epoch(0, 10)
    batches = [(torch.zeros(100, 1), None, None)] * 3
    counted = reporter.validating(batches)
    assert len(counted) == 3
    for _ in counted:
        clock.advance(40.0)  # each batch of 100 photos takes 40 s
    assert re.fullmatch(r"epoch 1/1 validation 100/300 photos: 2 img/s, ETA 1:20, run ETA \S+\n"
                        r"epoch 1/1 validation 200/300 photos: 2 img/s, ETA 0:40, run ETA \S+\n",
                        out.getvalue())
    out.truncate(0)
    out.seek(0)
    assert [batch for batch in reporter.validating(batches)] == batches  # fast: no line
    assert out.getvalue() == ""


@pytest.mark.parametrize("stdout, stderr, expected", [
    (True, True, "bar"), (False, True, "lines"), (True, False, "lines"), (False, False, "lines")])
def test_auto_draws_the_bar_only_when_stdout_and_stderr_are_terminals(stdout, stderr, expected):
    assert choose_mode("auto", Stream(stdout), Stream(stderr)) == expected
    assert choose_mode("lines", Stream(True), Stream(True)) == "lines"
    assert choose_mode("bar", Stream(False), Stream(False)) == "bar"


def test_on_a_terminal_the_bar_names_the_fold_and_the_runs_eta_and_no_line_is_printed():
    clock, out, err = FakeClock(), Stream(terminal=True), Stream(terminal=True)
    reporter = Reporter("auto", epochs=2, log_interval=1, stdout=out, stderr=err, clock=clock)
    assert reporter.mode == "bar"
    reporter.plan(three_folds(), n_folds=3)
    reporter.start_model(0, 0)
    reporter.end_model()
    reporter.start_model(1, 0)
    observer = reporter.epoch(0, 10)
    steps(observer, clock, 1, 10, loss=torch.tensor(1.5))
    assert out.getvalue() == ""
    drawn = err.getvalue()
    assert "fold 1/3 epoch 1/2" in drawn
    assert re.search(r"loss 1\.5000, run ETA \d+:\d\d", drawn)


def test_off_shows_nothing_and_leaves_the_batches_alone():
    out = Stream(terminal=False)
    reporter = Reporter("off", epochs=1, stdout=out, stderr=out)
    reporter.plan([ModelWork(None, 10, 10, 1)])
    reporter.start_model(None, 0)
    assert reporter.epoch(0, 1) is None
    batches = [(torch.zeros(2, 1), None, None)]
    assert reporter.validating(batches) is batches
    reporter.end_epoch()
    assert out.getvalue() == ""


@pytest.mark.parametrize("value, text", [(None, "?"), (float("nan"), "?"), (0, "0:00"),
                                         (59.6, "1:00"), (61, "1:01"), (3600 * 25 + 62, "25:01:02")])
def test_durations(value, text):
    assert duration(value) == text
