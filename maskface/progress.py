"""What a run shows while it trains, and the one place it is written: on a terminal, a tqdm bar
naming the fold and epoch with the run's ETA; in a log (nohup, a notebook cell, a pipe), plain
lines. The trainer only reports each step (``StepObserver``); this module decides what to print.

``--progress auto`` draws the bar when stdout and stderr are both terminals, else prints lines.
A line is printed after every ``--log_interval``-th step of an epoch, and sooner when
``--log_seconds`` have passed since the last line (or the epoch's start) without one:

    fold 2/5 epoch 3/10 step 40/88: loss 1.2340, lr 0.001, 312 img/s, epoch ETA 0:42, run ETA 12:10

The ETAs come from the training throughput measured so far in this call (each epoch's first step
is not timed: it pays for warm-ups), shown as ``?`` until two steps are timed. The epoch's ETA
runs to its epoch line (validation and checkpoint included, as the last epoch measured them); the
run's counts every epoch still to train in this call, of this fold and of the folds after it.
Early stopping can only end a run sooner, so the run's ETA is an upper bound.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence, TextIO

MODES = ("auto", "bar", "lines", "off")
UNTIMED_STEPS = 1     # an epoch's first step: allocation, cuDNN's autotuner, the first page-ins
MIN_TIMED_STEPS = 2   # no ETA from fewer timed steps than this
BAR_REFRESH_S = 0.5   # the bar's loss is read at most this often (on CUDA a read waits for the GPU)

# the trainer's per-step report: (1-based step, the batch's images, its loss, the lr)
StepObserver = Callable[[int, int, Any, float], None]


def choose_mode(mode: str, stdout: TextIO | None = None, stderr: TextIO | None = None) -> str:
    """``mode`` as given, or for auto: the bar when stdout and stderr are both terminals (tqdm
    draws on stderr), else lines (stdout goes to a log that a bar would fill with redraws)."""
    if mode != "auto":
        return mode
    streams = (sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr)
    return "bar" if all(_is_terminal(s) for s in streams) else "lines"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float | None) -> str:
    """H:MM:SS, or M:SS under an hour; ``?`` when not known yet."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class ModelWork:
    """A model this call still trains: its fold (None for a single run), this process's training
    and validation photos per epoch, and its epochs still to train."""
    fold: int | None
    train_images: int
    val_images: int
    epochs: int


class RunClock:
    """The ETA arithmetic of a run, on ``clock`` (seconds): the epoch's and the run's, from the
    training throughput measured so far and the validation + checkpoint time ("tail") the last
    finished epoch took. Before an epoch has finished, the tail is estimated as its validation
    photos at the training speed (an overestimate: validation runs forward only)."""

    def __init__(self, work: Sequence[ModelWork] = (), clock: Callable[[], float] = time.monotonic):
        self.work = [replace(w) for w in work]  # its epochs count down here
        self.clock = clock
        self.current = -1
        self.timed_images, self.timed_seconds, self.timed_steps = 0, 0.0, 0
        self.tail_seconds: float | None = None
        self.steps = self.step = self.epoch_images = 0
        self.epoch_started = self.last_step_at = 0.0
        self.train_ended_at: float | None = None

    def start_model(self, fold: int | None, epochs_left: int) -> None:
        """The model of ``fold`` starts (after ``epochs`` - ``epochs_left`` epochs, on a resume);
        a model the plan did not list is added after the others."""
        later = [i for i, w in enumerate(self.work) if i > self.current and w.fold == fold]
        if not later:
            self.work.append(ModelWork(fold, 0, 0, epochs_left))
            later = [len(self.work) - 1]
        self.current = later[0]
        self.work[self.current].epochs = epochs_left

    def start_epoch(self, steps: int) -> None:
        self.steps, self.step, self.epoch_images = steps, 0, 0
        self.epoch_started = self.last_step_at = self.clock()
        self.train_ended_at = None

    def record_step(self, step: int, images: int) -> None:
        now = self.clock()
        if step > UNTIMED_STEPS:
            self.timed_images += images
            self.timed_seconds += now - self.last_step_at
            self.timed_steps += 1
        self.step, self.last_step_at = step, now
        self.epoch_images += images
        if step >= self.steps:
            self.train_ended_at = now

    def end_epoch(self) -> None:
        """The epoch's line is out (validated, checkpointed): its tail is measured."""
        if self.train_ended_at is not None:
            self.tail_seconds = self.clock() - self.train_ended_at
        if 0 <= self.current < len(self.work):
            self.work[self.current].epochs = max(self.work[self.current].epochs - 1, 0)

    def end_model(self) -> None:
        """The model is done (its last epoch, or early stopping): none of its epochs remain."""
        if 0 <= self.current < len(self.work):
            self.work[self.current].epochs = 0

    @property
    def seconds_per_image(self) -> float | None:
        if self.timed_steps < MIN_TIMED_STEPS or not self.timed_images:
            return None
        return self.timed_seconds / self.timed_images

    def epoch_images_per_s(self) -> float:
        """This process's images per second in the epoch so far, first step included."""
        return self.epoch_images / max(self.last_step_at - self.epoch_started, 1e-9)

    def _tail(self, work: ModelWork, per_image: float) -> float:
        return self.tail_seconds if self.tail_seconds is not None else work.val_images * per_image

    def epoch_eta(self) -> float | None:
        """Seconds until the epoch's line: the rest of its training pass, then its tail."""
        per_image = self.seconds_per_image
        if per_image is None or not 0 <= self.current < len(self.work):
            return None
        work, now = self.work[self.current], self.clock()
        if self.train_ended_at is None:
            left = max(work.train_images - self.epoch_images, 0) * per_image
            return left + self._tail(work, per_image)
        return max(self._tail(work, per_image) - (now - self.train_ended_at), 0.0)

    def run_eta(self) -> float | None:
        """Seconds until this call's last epoch ends: this epoch, this model's later epochs and
        every epoch of the models after it."""
        epoch = self.epoch_eta()
        if epoch is None:
            return None
        per_image = self.seconds_per_image
        later = 0.0
        for i, work in enumerate(self.work[self.current:], start=self.current):
            epochs = work.epochs - 1 if i == self.current else work.epochs
            later += max(epochs, 0) * (work.train_images * per_image + self._tail(work, per_image))
        return epoch + later


class _BarSteps:
    """A tqdm bar over an epoch's steps, its postfix the latest loss and (with a run) the run's
    ETA."""

    def __init__(self, total: int, desc: str, *, file=None, disable: bool | None = False,
                 run: RunClock | None = None, clock: Callable[[], float] = time.monotonic):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, leave=False, file=file, disable=disable)
        self.total, self.run, self.clock = total, run, clock
        self.shown_at: float | None = None

    def __call__(self, step: int, images: int, loss, lr: float) -> None:
        if self.run is not None:
            self.run.record_step(step, images)
        self.bar.update(1)
        now = self.clock()
        if self.shown_at is None or now - self.shown_at >= BAR_REFRESH_S or step >= self.total:
            postfix = f"loss {float(loss):.4f}"
            if self.run is not None:
                postfix += f", run ETA {duration(self.run.run_eta())}"
            self.bar.set_postfix_str(postfix)  # redraws: the bar's own rate is by real time
            self.shown_at = now
        if step >= self.total:
            self.bar.close()


def bare_bar(total: int, desc: str) -> StepObserver:
    """A bar over ``total`` steps with the loss, on a terminal only: for a caller without a run."""
    return _BarSteps(total, desc, disable=None)


class Reporter:
    """What one training call prints while it trains (nothing on torchrun's other ranks: build
    it with mode "off" there). training.py tells it the plan, each model, epoch and validation;
    engine.train_one_epoch reports each step to the observer ``epoch`` returns."""

    def __init__(self, mode: str = "auto", *, epochs: int, log_interval: int = 20,
                 log_seconds: float = 30.0, world: int = 1, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.mode = choose_mode(mode, stdout, stderr)
        self.epochs, self.log_interval, self.log_seconds = epochs, log_interval, log_seconds
        self.world = world
        self._stdout, self._stderr = stdout, stderr
        self.clock = clock
        self.run = RunClock(clock=clock)
        self.n_folds: int | None = None
        self.fold: int | None = None
        self.epoch_index = 0
        self.last_line_at = 0.0

    @property
    def active(self) -> bool:
        return self.mode in ("bar", "lines")

    def plan(self, work: Sequence[ModelWork], n_folds: int | None = None) -> None:
        """The models this call will train, in order (a k-fold run: its folds still to train, of
        ``n_folds``)."""
        self.run = RunClock(work, self.clock)
        self.n_folds = n_folds

    def start_model(self, fold: int | None, first_epoch: int) -> None:
        """fit starts a model at ``first_epoch`` (0-based: epochs already trained)."""
        self.fold = fold
        self.run.start_model(fold, self.epochs - first_epoch)

    def prefix(self) -> str:
        """``fold 2/5 epoch 3/10`` (the fold as its folder and --fold name it: fold0 ..)."""
        fold = f"fold {self.fold}/{self.n_folds} " if self.fold is not None and self.n_folds else ""
        return f"{fold}epoch {self.epoch_index + 1}/{self.epochs}"

    def epoch(self, epoch: int, steps: int) -> StepObserver | None:
        """The observer of epoch ``epoch`` (0-based) of ``steps`` steps; None when nothing shows."""
        self.epoch_index = epoch
        self.run.start_epoch(steps)
        self.last_line_at = self.clock()
        if self.mode == "bar":
            return _BarSteps(steps, self.prefix(), file=self._stderr or sys.stderr, run=self.run,
                             clock=self.clock)
        if self.mode == "lines":
            return _LineSteps(self, steps)
        return None

    def end_epoch(self) -> None:
        """After the epoch's checkpoint and line."""
        self.run.end_epoch()

    def end_model(self) -> None:
        self.run.end_model()

    def validating(self, batches):
        """``batches`` as they are, counted while a pass of validation reads them: a bar, or a
        line every --log_seconds of a long pass."""
        if not self.active or not self.run.work:
            return batches
        return _Validation(self, batches, self.run.work[self.run.current].val_images)

    def say(self, line: str) -> None:
        print(line, file=self._stdout or sys.stdout, flush=True)
        self.last_line_at = self.clock()

    def due(self, step: int | None) -> bool:
        """A line is due after every --log_interval-th step, or --log_seconds after the last."""
        if step is not None and step % self.log_interval == 0:
            return True
        return bool(self.log_seconds) and self.clock() - self.last_line_at >= self.log_seconds


class _LineSteps:
    """An epoch's plain lines; the loss shown is the mean over the steps since the last line."""

    def __init__(self, reporter: Reporter, steps: int):
        self.reporter, self.steps = reporter, steps
        self.loss_sum, self.loss_images = None, 0

    def __call__(self, step: int, images: int, loss, lr: float) -> None:
        r = self.reporter
        r.run.record_step(step, images)
        weighted = loss * images  # stays on the device until a line reads it
        self.loss_sum = weighted if self.loss_sum is None else self.loss_sum + weighted
        self.loss_images += images
        if not r.due(step):
            return
        mean = float(self.loss_sum) / max(self.loss_images, 1)
        self.loss_sum, self.loss_images = None, 0
        rate = r.run.epoch_images_per_s() * r.world
        r.say(f"{r.prefix()} step {step}/{self.steps}: loss {mean:.4f}, lr {lr:.3g}, "
              f"{rate:.0f} img/s, epoch ETA {duration(r.run.epoch_eta())}, "
              f"run ETA {duration(r.run.run_eta())}")


class _Validation:
    """Validation batches, counted as a pass reads them (each pass anew: the model's, the
    EMA's)."""

    def __init__(self, reporter: Reporter, batches, photos: int):
        self.reporter, self.batches, self.photos = reporter, batches, photos

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterable:
        r = self.reporter
        started, done = r.clock(), 0
        r.last_line_at = started
        bar = None
        if r.mode == "bar":
            from tqdm import tqdm
            bar = tqdm(total=self.photos, desc=f"{r.prefix()} validation", unit="img",
                       leave=False, file=r._stderr or sys.stderr)
        try:
            for batch in self.batches:
                yield batch
                done += len(batch[0])
                if bar is not None:
                    bar.update(len(batch[0]))
                elif done < self.photos and r.due(None):
                    elapsed = r.clock() - started
                    left = elapsed / done * (self.photos - done) if done else None
                    r.say(f"{r.prefix()} validation {done}/{self.photos} photos: "
                          f"{done * r.world / max(elapsed, 1e-9):.0f} img/s, "
                          f"ETA {duration(left)}, run ETA {duration(r.run.run_eta())}")
        finally:
            if bar is not None:
                bar.close()
