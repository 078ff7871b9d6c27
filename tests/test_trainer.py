import copy
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine
from monai.data import DataLoader

from monai_salm.api import make_dataset, protect_tensor, train_salm
from monai_salm.engines import SALMTrainer, load_protection, protection_transforms, save_protection, train_reader
from monai_salm.transforms.functional import flip_average, recalibrate_batchnorm, saliency_scores, topk_mask
from monai_salm.networks import NoiseGenerator

from conftest import TinyClassifier


def _data(n=32, spatial=(12, 12), channels=1, num_classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = (0.3 * torch.rand(n, channels, *spatial, generator=g) + 0.5 * y.reshape(-1, *[1] * (len(spatial) + 1)) / (num_classes - 1)).clamp(0, 1)
    return x, y


def _trainer(x, y, tmp_path=None, handlers=None, **kw):
    sd, c = x.ndim - 2, x.shape[1]
    torch.manual_seed(0)
    f = TinyClassifier(sd, c, int(y.max()) + 1)
    g = NoiseGenerator(sd, c, int(y.max()) + 1, channels=(4, 8, 16))
    loader = DataLoader(make_dataset(x, y), batch_size=8, shuffle=True)
    opts = dict(epsilon=0.1, k=0.2, max_epochs=2, stop_accuracy=None)
    opts.update(kw)
    return SALMTrainer(
        device="cpu",
        train_data_loader=loader,
        surrogate=f,
        generator=g,
        surrogate_optimizer=torch.optim.SGD(f.parameters(), lr=0.01),
        generator_optimizer=torch.optim.Adam(g.parameters(), lr=1e-3),
        train_handlers=handlers,
        **opts,
    )


def test_trainer_with_monai_handlers(tmp_path):
    x, y = _data()
    val_loader = DataLoader(make_dataset(x[:8], y[:8]), batch_size=8)
    trainer = _trainer(x, y)
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=val_loader, network=trainer.surrogate)
    handlers = [
        StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True), name="salm_test"),
        TensorBoardStatsHandler(log_dir=str(tmp_path / "tb"), output_transform=from_engine(["loss"], first=True)),
        CheckpointSaver(save_dir=str(tmp_path / "ckpt"), save_dict={"generator": trainer.generator, "surrogate": trainer.surrogate}, save_final=True),
        ValidationHandler(validator=evaluator, interval=1),
    ]
    for h in handlers:
        h.attach(trainer)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(from_engine(["loss", "generator_loss"], first=True)(e.state.output)))
    trainer.run()
    assert trainer.state.epoch == 2
    assert len(losses) == 8 and all(np.isfinite(a) and np.isfinite(b) for a, b in losses)
    assert 0.0 <= trainer.state.metrics["protected_accuracy"] <= 1.0
    assert list((tmp_path / "tb").iterdir())
    assert list((tmp_path / "ckpt").glob("*.pt"))
    assert evaluator.state.iteration > 0
    assert trainer.masks.shape == (32, 1, 12, 12)
    assert trainer.masks.sum(dim=(1, 2, 3)).tolist() == [round(0.2 * 144)] * 32


def test_stop_rule_terminates_early():
    x, y = _data()
    trainer = _trainer(x, y, max_epochs=5, stop_accuracy=1e-6, min_epochs=1)
    trainer.run()
    assert trainer.state.epoch == 1


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_stop_accuracy_outside_an_accuracy_is_refused(value):
    x, y = _data()
    with pytest.raises(ValueError, match="stop_accuracy"):
        _trainer(x, y, stop_accuracy=value)


@pytest.mark.parametrize("mode", ["class", "random"])
def test_mask_modes(mode):
    x, y = _data(spatial=(8, 10))
    trainer = _trainer(x, y, mask_mode=mode, max_epochs=1, flip_symmetric=True)
    trainer.run()
    if mode == "class":
        assert trainer.class_scores.shape == (2, 8, 10)
        assert trainer.class_masks.sum(dim=(1, 2, 3)).tolist() == [16, 16]
    else:
        assert trainer.masks.sum(dim=(1, 2, 3)).tolist() == [16] * 32


def test_bad_mode_and_budget():
    x, y = _data()
    with pytest.raises(ValueError, match="mask_mode"):
        _trainer(x, y, mask_mode="saliency")
    with pytest.raises(ValueError, match="epsilon"):
        _trainer(x, y, epsilon=0.0)
    with pytest.raises(ValueError, match="k"):
        _trainer(x, y, k=1.5)


def test_flip_average_is_flip_invariant():
    s = torch.rand(2, 5, 6)
    avg = flip_average(s)
    assert torch.allclose(avg, avg.flip(1)) and torch.allclose(avg, avg.flip(2))


@pytest.mark.parametrize("spatial, mode", [((12, 12), "sample"), ((12, 12), "class"), ((8, 8, 8), "sample")])
def test_checkpoint_round_trip_matches_transforms(tmp_path, spatial, mode):
    x, y = _data(n=16, spatial=spatial)
    trainer, settings = train_salm(
        x, y, 2, epochs=1, k=0.1, epsilon=0.1, mask_mode=mode, batch_size=8, generator_kwargs={"channels": (4, 8, 16)}
    )
    path = save_protection(tmp_path / "salm.pt", settings, trainer.generator, trainer.surrogate, trainer.class_scores)
    settings2, gen, sur, scores = load_protection(path)
    assert settings2 == settings
    batch_out, masks = protect_tensor(x, y, settings2, gen, sur, scores)
    transforms = protection_transforms(path)
    for i in (0, 5):
        out = transforms({"image": x[i], "label": int(y[i])})
        assert torch.equal(out["salm_mask"].bool(), masks[i])
        assert torch.allclose(out["image"], batch_out[i], atol=1e-6)
    diff = (batch_out - x).abs()
    assert diff.max() <= 0.1 + 1e-6 and diff[~masks.expand_as(diff)].max() == 0


def test_load_rejects_foreign_file(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"a": 1}, bad)
    with pytest.raises(ValueError, match="not a monai-salm checkpoint"):
        load_protection(bad)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_protection(tmp_path / "junk.pt")


def test_fresh_model_monitor_records_and_stops():
    from monai_salm.engines import FreshModelMonitor

    x, y = _data()
    trainer = _trainer(x, y, max_epochs=4)
    monitor = FreshModelMonitor(lambda: TinyClassifier(2, 1, 2), x[:16], y[:16], torch.arange(16), x[16:], y[16:], steps=3, batch_size=8, target=1.0)
    monitor.attach(trainer)
    trainer.run()
    assert trainer.state.epoch == 1
    assert len(monitor.history) == 1 and 0.0 <= trainer.state.metrics["fresh_clean_accuracy"] <= 1.0


@pytest.mark.parametrize("view_prob, expected", [(1.0, 8), (0.0, 0)])
def test_surrogate_view_applied_in_both_steps(view_prob, expected):
    """``surrogate_view`` sees the protected batch in the surrogate and the generator step, with its probability."""
    x, y = _data()
    seen = []

    def view(batch):
        seen.append(batch.requires_grad)
        return batch.flip(-1)

    trainer = _trainer(x, y, max_epochs=1, surrogate_view=view, view_prob=view_prob)
    trainer.run()
    assert len(seen) == expected  # 4 iterations x (surrogate step + 1 generator step)
    assert seen.count(True) == expected // 2  # the generator step differentiates through the view


def test_train_salm_robust_to_median():
    x, y = _data(n=16)
    trainer, _ = train_salm(x, y, 2, epochs=1, warmup_epochs=0, batch_size=8, surrogate=TinyClassifier(2, 1, 2),
                            generator_kwargs={"channels": (4, 8, 16)}, robust_to="median")
    assert trainer.surrogate_view is not None and trainer.state.epoch == 1
    with pytest.raises(ValueError, match="preprocess"):
        train_salm(x, y, 2, epochs=1, surrogate=TinyClassifier(2, 1, 2), robust_to="mixup")


def test_train_salm_through_the_attackers_flips_and_shifts_with_a_faster_pattern():
    x, y = _data(n=16)
    start = NoiseGenerator(2, 1, 2, pattern_size=(12, 12), pattern_cell=4, channels=(4, 8, 16)).class_code.detach()
    runs = {}
    for pattern_lr in (None, 0.5):
        trainer, _ = train_salm(x, y, 2, epochs=1, warmup_epochs=0, batch_size=8, surrogate=TinyClassifier(2, 1, 2),
                                generator_kwargs={"channels": (4, 8, 16)}, robust_to="flip,crop:2",
                                pattern_lr=pattern_lr)
        groups = trainer.generator_optimizer.param_groups
        assert [g["lr"] for g in groups] == ([2e-3] if pattern_lr is None else [2e-3, 0.5])
        runs[pattern_lr] = float((trainer.generator.class_code.detach() - start).abs().max())
    assert runs[None] <= 2 * 2e-3 + 1e-6  # Adam moves each value by about lr per step: 2 steps
    assert runs[0.5] > 0.5  # the pattern's own rate lets it leave its random start


def test_least_salient_placement_takes_the_other_end_of_the_class_scores():
    x, y = _data(n=16)
    trainer = _trainer(x, y, mask_mode="class", k=0.25)
    trainer.refresh_masks()
    salient_scores, salient_masks = trainer.class_scores.clone(), trainer.class_masks.clone()
    trainer.mask_placement = "least-salient"
    trainer.refresh_masks()  # the same surrogate, scored again
    low = topk_mask(-salient_scores, trainer.k).bool()
    assert torch.equal(trainer.class_masks, low) and not (trainer.class_masks & salient_masks).any()
    assert (trainer.class_scores >= 0).all()  # stored scores a release ranks the same way
    assert torch.equal(topk_mask(trainer.class_scores, trainer.k).bool(), trainer.class_masks)
    with pytest.raises(ValueError, match="placement"):
        _trainer(x, y, mask_mode="class", mask_placement="edge")
    with pytest.raises(ValueError, match="mask_mode='class'"):
        _trainer(x, y, mask_mode="sample", mask_placement="least-salient")


def test_joint_step_updates_both_networks_from_one_surrogate_pass():
    """One surrogate forward per iteration instead of two; its surrogate update is the alternating one's (same noise,
    same batch), and the generator learns from the same loss."""
    x, y = _data()
    runs = {}
    for joint in (False, True):
        trainer = _trainer(x, y, max_epochs=1, epoch_length=1, mask_refresh=0, joint_step=joint)
        g0 = [p.detach().clone() for p in trainer.generator.parameters()]
        calls = []
        trainer.surrogate.register_forward_hook(lambda *_: calls.append(trainer.state.iteration))
        trainer.run()
        runs[joint] = trainer
        assert calls.count(1) == (1 if joint else 2)  # the mask pass before the first iteration counts as 0
        assert any(not torch.equal(a, b) for a, b in zip(g0, trainer.generator.parameters()))
        if joint:  # one loss for both networks
            assert trainer.state.output[0]["generator_loss"] == pytest.approx(trainer.state.output[0]["loss"])
    for a, b in zip(runs[False].surrogate.parameters(), runs[True].surrogate.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(runs[False].generator.parameters(),
                                                         runs[True].generator.parameters()))


@pytest.mark.parametrize("joint", [False, True])
def test_adversarial_surrogate_sees_protected_batch_plus_bounded_loss_raising_change(joint):
    """With adversarial_radius the surrogate and generator steps see x' + r, |r| <= radius, r raising the surrogate's
    loss; each PGD step is one more surrogate pass."""
    x, y = _data()
    radius, steps = 4 / 255, 3
    trainer = _trainer(x, y, max_epochs=1, epoch_length=1, mask_refresh=0, adversarial_radius=radius,
                       adversarial_steps=steps, joint_step=joint)
    shifts, seen, checking = [], [], []
    compute = trainer._adversarial_shift

    def record(protected, labels):
        shift = compute(protected, labels)
        checking.append(True)  # the check's own passes are not the trainer's
        with torch.no_grad():
            model = copy.deepcopy(trainer.surrogate).eval()
            before = torch.nn.functional.cross_entropy(model(protected), labels)
            after = torch.nn.functional.cross_entropy(model(protected + shift), labels)
        checking.clear()
        shifts.append((protected.detach().clone(), shift, float(before), float(after)))
        return shift

    def hook(module, inputs, _):
        if not checking:
            seen.append((trainer.state.iteration, module.training, inputs[0].detach().clone()))

    trainer._adversarial_shift = record
    trainer.surrogate.register_forward_hook(hook)
    trainer.run()
    (protected, shift, before, after), = shifts
    assert 0 < float(shift.abs().max()) <= radius + 1e-6
    assert ((protected + shift) >= 0).all() and ((protected + shift) <= 1).all()
    assert after > before
    first = [(training, inp) for it, training, inp in seen if it == 1]
    assert len(first) == steps + (1 if joint else 2)
    assert sum(not training for training, _ in first) == steps  # PGD runs the surrogate in eval mode
    for _, inp in (f for f in first if f[0]):  # every training pass reads the shifted batch
        assert torch.allclose(inp, protected + shift, atol=1e-6)
    with pytest.raises(ValueError, match="adversarial_radius"):
        _trainer(x, y, adversarial_radius=-0.1)
    with pytest.raises(ValueError, match="value_range"):
        _trainer(x, y, adversarial_radius=0.01, value_range=(-1.0, 1.0))


def test_refresh_samples_scores_a_fixed_subset_after_the_first_refresh():
    """The first refresh scores every image and picks a seeded subset holding every class; the refreshes during
    training score only it, and give the class scores a full refresh of those images gives; an explicit refresh
    (the one before release) scores every image again."""
    x, y = _data(n=32, num_classes=3)
    y[y == 2] = 0
    y[5] = 2  # one image of class 2, which a random subset of 6 would rarely hold
    trainer = _trainer(x, y, mask_mode="class", k=0.25, refresh_samples=6, max_epochs=3, epoch_length=1,
                       mask_loader=DataLoader(make_dataset(x, y), batch_size=16, shuffle=False))
    scored = []
    score = trainer._clean_saliency
    trainer._clean_saliency = lambda loader: (scored.append(len(loader.dataset)), score(loader))[1]
    trainer.run()
    subset = trainer.subset_loader.dataset.indices
    assert scored == [32, len(subset), len(subset)] and len(subset) in (6, 7) and 5 in subset
    assert subset == sorted(set(subset)) and set(y[subset].tolist()) == {0, 1, 2}
    trainer.refresh_masks(subset=True)
    only = _trainer(x[subset], y[subset], mask_mode="class", k=0.25,
                    mask_loader=DataLoader(make_dataset(x[subset], y[subset]), batch_size=16, shuffle=False))
    only.surrogate.load_state_dict(trainer.surrogate.state_dict())
    only.refresh_masks()
    torch.testing.assert_close(trainer.class_scores, only.class_scores)
    trainer.refresh_masks()
    assert scored[-1] == 32
    with pytest.raises(ValueError, match="refresh_samples"):
        _trainer(x, y, refresh_samples=-1)


def test_refresh_samples_leaves_per_sample_masks_whole():
    x, y = _data(n=16)
    trainer = _trainer(x, y, mask_mode="sample", refresh_samples=4)
    trainer.refresh_masks()
    trainer.refresh_masks(subset=True)
    assert trainer.subset_loader is None and trainer.masks.shape[0] == 16


@pytest.mark.parametrize("n", [32, 33])
def test_mask_refresh_scores_and_recalibrates_in_one_pass(n):
    """One surrogate pass per clean batch gives the masks and the running statistics recalibrate_batchnorm gives,
    and a lone last image is scored with the statistics gathered before it."""
    x, y = _data(n=n)
    mask_loader = DataLoader(make_dataset(x, y), batch_size=16, shuffle=False)
    trainer = _trainer(x, y, mask_mode="sample", mask_loader=mask_loader)
    with torch.no_grad():  # statistics a training run would leave behind
        trainer.surrogate.train()(x[:8] * 3)
    expected = copy.deepcopy(trainer.surrogate)
    recalibrate_batchnorm(expected, [x[i:i + 16] for i in range(0, n, 16)])
    calls = []
    handle = trainer.surrogate.register_forward_hook(lambda *_: calls.append(1))
    trainer.refresh_masks()
    handle.remove()
    assert len(calls) == len(mask_loader)
    bn, ref = trainer.surrogate.net[1], expected.net[1]
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert bn.momentum == ref.momentum == 0.1 and trainer.surrogate.training
    for i in range(0, n, 16):  # batch statistics; running statistics for the lone image
        lone = x[i:i + 16].shape[0] < 2
        scores = saliency_scores(copy.deepcopy(expected), x[i:i + 16], y[i:i + 16], eval_mode=lone)
        assert torch.equal(trainer.masks[i:i + 16], topk_mask(scores, 0.2).bool())


def test_train_reader_learns_the_clean_images_and_comes_back_frozen():
    x, y = _data(n=64)
    torch.manual_seed(0)
    reader = train_reader(TinyClassifier(2, 1, 2), make_dataset(x, y), epochs=15, batch_size=16, lr=1e-2)
    assert not reader.training and not any(p.requires_grad for p in reader.parameters())
    with torch.no_grad():
        assert float((reader(x).argmax(1) == y).float().mean()) == 1.0
    stats = [b.clone() for b in reader.buffers()]  # already the clean images' own batch-norm statistics:
    recalibrate_batchnorm(reader, [x])  # estimating them again changes nothing
    for a, b in zip(stats, reader.buffers()):
        assert torch.allclose(a, b, atol=1e-5) or a.dtype == torch.long
    with pytest.raises(ValueError, match="at least one epoch"):
        train_reader(TinyClassifier(2, 1, 2), make_dataset(x, y), epochs=0)


@pytest.mark.parametrize("joint", [False, True])
def test_reader_term_reads_the_release_and_moves_only_the_generator(joint):
    """With ``reader_weight`` the generator also minimises KL(reader(x) || reader(x')): the frozen reader reads the
    clean batch and the protected batch as released, the surrogate's update is the one without the term, and the
    generator's is not."""
    x, y = _data()
    torch.manual_seed(1)
    reader = TinyClassifier(2, 1, 2).eval().requires_grad_(False)
    reader_before = [p.detach().clone() for p in reader.parameters()]
    runs = {}
    for weight in (0.0, 5.0):
        trainer = _trainer(x, y, max_epochs=1, epoch_length=1, mask_refresh=0, joint_step=joint, reader=reader,
                           reader_weight=weight)
        seen = []
        handle = reader.register_forward_hook(lambda module, inputs, _, seen=seen: seen.append(inputs[0].detach().clone()))
        trainer.run()
        handle.remove()
        runs[weight] = (trainer, seen)
    assert runs[0.0][1] == []  # off: the reader is never run
    trainer, (read, clean) = runs[5.0][0], runs[5.0][1]
    released = torch.stack([o["image"] for o in trainer.state.output])
    assert torch.allclose(read, released, atol=1e-6)
    change = read - clean
    assert 0 < float(change.abs().max()) <= 0.1 + 1e-6
    assert int((change != 0).flatten(1).sum(1).max()) <= round(0.2 * 12 * 12)  # only inside each image's mask
    for a, b in zip(reader_before, reader.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(runs[0.0][0].surrogate.parameters(), trainer.surrogate.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(runs[0.0][0].generator.parameters(),
                                                         trainer.generator.parameters()))
    with pytest.raises(ValueError, match="needs a reader"):
        _trainer(x, y, reader_weight=1.0)
    with pytest.raises(ValueError, match="reader_target"):
        _trainer(x, y, reader=reader, reader_weight=1.0, reader_target="anatomy")
    with pytest.raises(ValueError, match="reader_weight"):
        _trainer(x, y, reader=reader, reader_weight=-1.0)


def test_reader_term_targets():
    """``clean``: zero when the release equals the original, positive and differentiable otherwise; ``uniform``:
    KL(uniform || reader(x')), zero exactly when the reader reads no class from the protected image."""
    x, y = _data()
    reader = TinyClassifier(2, 1, 2).eval().requires_grad_(False)
    clean = _trainer(x, y, reader=reader, reader_weight=2.0)
    assert float(clean._reader_term(x, x)) == pytest.approx(0.0, abs=1e-6)
    protected = (x + 0.1).clamp(0, 1).requires_grad_(True)
    term = clean._reader_term(x, protected)
    term.backward()
    assert float(term.detach()) > 0 and float(protected.grad.abs().sum()) > 0
    uniform = _trainer(x, y, reader=reader, reader_weight=2.0, reader_target="uniform")
    with torch.no_grad():
        log_q = torch.log_softmax(reader(x), 1)
    expected = 2.0 * float((0.5 * (-math.log(2) - log_q)).sum(1).mean())
    assert float(uniform._reader_term(x, x)) == pytest.approx(expected, rel=1e-5)
    blank = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12 * 12, 2))
    torch.nn.init.zeros_(blank[1].weight), torch.nn.init.zeros_(blank[1].bias)
    reads_nothing = _trainer(x, y, reader=blank.eval().requires_grad_(False), reader_weight=2.0,
                             reader_target="uniform")
    assert float(reads_nothing._reader_term(x, x)) == pytest.approx(0.0, abs=1e-7)
