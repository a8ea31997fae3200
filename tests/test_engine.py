"""The optimisation step: gradient accumulation equals one big batch, clipping (also under a
GradScaler) and the EMA act once per update, timm's optimizers and schedules build, keep their
state through a checkpoint, and per-part learning rates."""
import io

import pytest
import torch
from torch import nn

import benchmark
from maskface import (
    augmentation,
    config,
    engine,
    loss as losses,
    model as models,
)
from maskface.bench import speed
from maskface.cli import UserError
from maskface.settings import resolve_settings


def tiny_net() -> nn.Module:
    """Deterministic in train mode (no dropout, no batch statistics), so batch splits compare."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return models.ImageClassifier(backbone, 4, (3,))


def tiny_trainer(accum: int = 1, clip: float | None = None, clip_mode: str = "norm",
                 scaler=None, ema_decay: float | None = None) -> engine.Trainer:
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    ema = None if ema_decay is None else engine.ModelEmaV3(net, decay=ema_decay)
    return engine.Trainer(
        net=net, runner=net, criterion=losses.build_loss("cross_entropy", 3), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), per_batch_schedule=False,
        scaler=scaler, augment=augmentation.build_augmentation("BaseAugmentation"), mixer=None,
        autocast_dtype=None, channels_last=False, ema=ema, accum_steps=accum, clip_grad=clip,
        clip_mode=clip_mode)


def photos(n: int = 8):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 8, 8, 3), generator=generator, dtype=torch.uint8)
    targets = torch.randint(0, 3, (n,), generator=generator)
    return images, targets


def batches(sizes: list[int]):
    images, targets = photos(sum(sizes))
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], targets[start:start + size],
                    torch.arange(start, start + size)))
        start += size
    return out


def trained(trainer: engine.Trainer, sizes: list[int]) -> dict:
    engine.train_one_epoch(trainer, batches(sizes), progress=False)
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_accumulated_batches_make_the_update_of_one_big_batch():
    one_big = trained(tiny_trainer(), [8])
    assert_same(trained(tiny_trainer(accum=4), [2, 2, 2, 2]), one_big)
    # 4 batches in groups of 3: a group of 3 and a last, shorter group of 1 (not 1/3 of a step)
    two_updates = trained(tiny_trainer(), [6, 2])
    accumulated = tiny_trainer(accum=3)
    assert_same(trained(accumulated, [2, 2, 2, 2]), two_updates)
    assert accumulated.updates == 2
    # and accumulation did something: single small batches give another result
    with pytest.raises(AssertionError):
        assert_same(trained(tiny_trainer(), [2, 2, 2, 2]), one_big)


def test_every_step_is_reported_to_the_observer_with_its_images_loss_and_lr():
    heard = []
    result = engine.train_one_epoch(tiny_trainer(accum=2), batches([3, 2, 3]), progress=False,
                                    on_step=lambda *report: heard.append(report))
    assert [(step, images) for step, images, _, _ in heard] == [(1, 3), (2, 2), (3, 3)]
    assert all(lr == 0.5 for *_, lr in heard)
    mean = sum(float(loss) * images for _, images, loss, _ in heard) / 8
    assert mean == pytest.approx(result["loss"], rel=1e-5)


def test_clipping_bounds_the_update_and_happens_on_unscaled_gradients():
    start = {k: v.clone() for k, v in tiny_net().state_dict().items()}
    clipped = trained(tiny_trainer(clip=1e-3), [8])
    step = torch.cat([(clipped[k] - start[k]).flatten() for k in start])
    assert step.norm().item() == pytest.approx(0.5 * 1e-3, rel=1e-3)  # lr x clip norm
    by_value = trained(tiny_trainer(clip=1e-4, clip_mode="value"), [8])
    step = torch.cat([(by_value[k] - start[k]).flatten() for k in start])
    assert step.abs().max().item() <= 0.5 * 1e-4 * (1 + 1e-3)  # float32 rounding of the weights
    # a GradScaler multiplies the loss by 65536: unscaled before clipping, nothing changes
    scaled = trained(tiny_trainer(accum=2, clip=1e-3, scaler=torch.amp.GradScaler("cpu")),
                     [4, 4])
    assert_same(scaled, trained(tiny_trainer(accum=2, clip=1e-3), [4, 4]))


def test_ema_steps_once_per_update_and_differs_from_the_model():
    trainer = tiny_trainer(accum=2, ema_decay=0.5)
    after = []
    for sizes in ([2, 2], [2, 2]):
        after.append(trained(trainer, sizes))
    ema = trainer.ema.module.state_dict()
    # first update: the EMA starts as the model; second: halfway to it (decay 0.5)
    for key in after[0]:
        torch.testing.assert_close(ema[key], 0.5 * after[0][key] + 0.5 * after[1][key])
    assert any(not torch.equal(ema[k], after[1][k]) for k in ema)


def settings(*flags: str):
    return config.parse_args(["--epochs", "4", *flags])


def test_every_optimizer_steps_and_its_state_loads_weights_only():
    # kron* also step, but their first step compiles for ~15 s: left out to keep the suite quick
    for name in (n for n in engine.OPTIMIZERS if not n.startswith("kron")):
        net = tiny_net()
        optimizer = engine.build_optimizer(settings("--optimizer", name), net.parameters(),
                                           torch.device("cpu"))
        net(photos(4)[0].permute(0, 3, 1, 2).float()).square().mean().backward()
        optimizer.step()
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    # the first names keep torch's meaning (timm's 'sgd' would be Nesterov momentum)
    sgd = engine.build_optimizer(settings("--optimizer", "sgd"), tiny_net().parameters(), torch.device("cpu"))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0
    assert type(engine.build_optimizer(settings("--optimizer", "adam"), tiny_net().parameters(),
                                       torch.device("cpu"))) is torch.optim.Adam
    lamb = engine.build_optimizer(settings("--optimizer", "lamb"), tiny_net().parameters(), torch.device("cpu"))
    assert type(lamb).__module__.startswith("timm.optim")


@pytest.mark.parametrize("name", engine.TIMM_SCHEDULERS)
def test_timm_schedules_warm_up_and_resume_exactly(name):
    args = settings("--scheduler", name, "--warmup_epochs", "1", "--warmup_lr", "1e-4",
                    "--min_lr", "1e-5", "--lr", "1e-2", "--lr_decay_step", "2")
    optimizer = torch.optim.SGD(tiny_net().parameters(), lr=args.lr)
    scheduler, per_update = engine.build_scheduler(args, optimizer, steps_per_epoch=5)
    assert per_update and engine.is_timm_schedule(scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the warm-up's start
    lrs = []
    for update in range(1, 21):  # 4 epochs of 5 updates
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
    warming = lrs[:5]  # linear from --warmup_lr over the first epoch, into the schedule
    assert all(a < b for a, b in zip(warming, warming[1:])) and max(lrs) <= 1e-2 * (1 + 1e-6)
    if name == "cosine":
        assert lrs[-1] == pytest.approx(1e-5)  # the floor
    # the state through a weights-only checkpoint: a new scheduler continues identically
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    resumed_opt = torch.optim.SGD(tiny_net().parameters(), lr=args.lr)
    resumed, _ = engine.build_scheduler(args, resumed_opt, steps_per_epoch=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    scheduler.step_update(21)
    resumed.step_update(21)
    assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_heads_learn_at_their_multiple_and_layer_decay_is_timms():
    net = models.build_model("BaseModel", 3)
    groups = models.parameter_groups(net, 1e-3, 0.0, head_lr_mult=10)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.heads.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # the ratio holds under a schedule
    args = settings("--scheduler", "cosine", "--head_lr_mult", "10")
    optimizer = engine.build_optimizer(args, groups, torch.device("cpu"))
    scheduler, _ = engine.build_scheduler(args, optimizer, steps_per_epoch=3)
    scheduler.step_update(5)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[1] == pytest.approx(10 * lrs[0]) and lrs[0] < 1e-3
    # torch's cycliclr cycles each group between its own lr and 10 times it
    args = settings("--scheduler", "cycliclr", "--head_lr_mult", "10")
    optimizer = engine.build_optimizer(args, models.parameter_groups(net, 1e-3, 0.0, head_lr_mult=10),
                                       torch.device("cpu"))
    scheduler, _ = engine.build_scheduler(args, optimizer, steps_per_epoch=3)
    assert scheduler.max_lrs == [pytest.approx(1e-2), pytest.approx(1e-1)]
    # one group as before when nothing differs (old last.pth files keep loading)
    assert len(models.parameter_groups(net, 1e-3, 0.0)) == 1
    timm_net = models.build_model("test_resnet", 3)
    decayed = models.parameter_groups(timm_net, 1e-3, 0.0, layer_decay=0.5)
    backbone_lrs = [g["lr"] for g in decayed[:-1]]
    assert min(backbone_lrs) < max(backbone_lrs) == pytest.approx(1e-3)
    assert "lr_scale" not in decayed[0] and decayed[-1]["lr"] == pytest.approx(1e-3)
    with pytest.raises(UserError, match="--layer_decay needs a timm model"):
        models.parameter_groups(net, 1e-3, 0.0, layer_decay=0.5)


def test_benchmark_and_train_build_the_same_trainer(tiny_train_dir):
    # benchmark.py times the trainer train.py trains: the same flags give the same model (same
    # weights from the same seed), optimizer, loss, augmentation and precision
    flags = ["--model", "resnet18", "--resize", "64", "48", "--batch_size", "8",
             "--optimizer", "sgd", "--amp", "off", "--device", "cpu"]
    benchmark_settings = speed.train_settings(benchmark.parse_args(
        [*flags, "--data_dir", str(tiny_train_dir)]), torch.device("cpu"))
    train_settings = resolve_settings(config.parse_args(flags), say=lambda _: None)
    trainers = []
    for settings in (benchmark_settings, train_settings):
        torch.manual_seed(0)
        trainers.append(engine.build_trainer(settings, 18, torch.device("cpu"), steps_per_epoch=2))
    timed, trained = trainers
    assert timed.net.model_config == trained.net.model_config
    timed_weights, trained_weights = timed.net.state_dict(), trained.net.state_dict()
    assert all(torch.equal(timed_weights[k], trained_weights[k]) for k in trained_weights)
    assert type(timed.optimizer) is type(trained.optimizer) is torch.optim.SGD
    assert timed.optimizer.defaults == trained.optimizer.defaults
    assert type(timed.criterion) is type(trained.criterion)
    assert type(timed.augment) is type(trained.augment)
    assert (timed.autocast_dtype, timed.channels_last) == (trained.autocast_dtype,
                                                           trained.channels_last)


def epoch_lrs(args, n: int, steps_per_epoch: int = 7) -> tuple[list, bool, object]:
    net = tiny_net()
    optimizer = engine.build_optimizer(args, net.parameters(), torch.device("cpu"))
    scheduler, per_batch = engine.build_scheduler(args, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: the order torch expects, nothing moves
        scheduler.step()
    return lrs, per_batch, scheduler


def test_cycliclr_keeps_its_three_modes_and_the_seeds_epochs_with_tmax():
    # --tmax: epochs per half-cycle, stepped per epoch, as the seed code steps it
    lrs, per_batch, _ = epoch_lrs(settings("--scheduler", "cycliclr", "--lr", "0.01", "--maxlr",
                                           "0.1", "--tmax", "2", "--mode", "triangular2"), 7)
    assert not per_batch
    assert lrs == pytest.approx([0.01, 0.055, 0.1, 0.055, 0.01, 0.0325, 0.055])
    lrs, _, _ = epoch_lrs(settings("--scheduler", "cycliclr", "--lr", "0.01", "--maxlr", "0.1",
                                   "--tmax", "2"), 7)
    assert lrs == pytest.approx([0.01, 0.055, 0.1, 0.055, 0.01, 0.055, 0.1])
    lrs, _, _ = epoch_lrs(settings("--scheduler", "cycliclr", "--lr", "0.01", "--maxlr", "0.1",
                                   "--tmax", "1", "--mode", "exp_range", "--gamma", "0.5"), 3)
    assert lrs == pytest.approx([0.01, 0.01 + 0.09 * 0.5, 0.01])
    # without --tmax: one epoch up, stepped per batch (the toolkit's, unchanged)
    _, per_batch, scheduler = epoch_lrs(settings("--scheduler", "cycliclr"), 1)
    assert per_batch and scheduler.total_size == 14 and scheduler.cycle_momentum is False


def test_defaults_seed_builds_the_seeds_schedules():
    # its CyclicLR: 0.001 -> 0.1 over 5 epochs, SGD's momentum cycled against the lr
    lrs, per_batch, scheduler = epoch_lrs(settings("--defaults", "seed", "--scheduler",
                                                   "cycliclr"), 6)
    assert not per_batch and scheduler.cycle_momentum is True and scheduler.mode == "triangular"
    assert lrs == pytest.approx([0.001, 0.0208, 0.0406, 0.0604, 0.0802, 0.1])
    # its CosineAnnealingLR: T_max = --tmax 5 down to lr / 100; its StepLR every 5 epochs
    lrs, _, scheduler = epoch_lrs(settings("--defaults", "seed", "--scheduler",
                                           "cosineannealinglr"), 6)
    assert scheduler.eta_min == pytest.approx(1e-5) and lrs[5] == pytest.approx(1e-5)
    lrs, _, _ = epoch_lrs(settings("--defaults", "seed"), 6)
    assert lrs == pytest.approx([1e-3] * 5 + [5e-4])
    lrs, _, _ = epoch_lrs(settings("--scheduler", "cosineannealinglr", "--epochs", "5"), 6)
    assert lrs[5] == 0.0
