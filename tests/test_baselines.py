import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_salm.evaluation.baselines import _slices, error_minimizing_noise, one_pixel_shortcut, uniform_noise_in_mask

SHAPES = {2: (1, 12, 12), 3: (1, 8, 8, 8)}
EPS = 8 / 255
TOL = 1e-6  # float rounding of (x + delta) - x


def _data(dims, n=32, channels=None, num_classes=2, seed=0, lo=0.0, hi=1.0):
    shape = SHAPES[dims] if channels is None else (channels, *SHAPES[dims][1:])
    gen = torch.Generator().manual_seed(seed)
    images = lo + (hi - lo) * torch.rand(n, *shape, generator=gen)
    labels = torch.arange(n) % num_classes
    return images, labels


def _changed_positions(a, b):
    """Per image, the spatial positions where any channel differs."""
    return (a != b).any(dim=1)


# ------------------------------------------------------------------------------------ uniform noise in mask
@pytest.mark.parametrize("dims", [2, 3])
def test_uniform_noise_bounds_mask_and_range(dims):
    images, _ = _data(dims)
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(images.shape[0], 1, *images.shape[2:], generator=gen) < 0.1
    before = images.clone()
    out = uniform_noise_in_mask(images, masks, EPS, seed=3)
    assert torch.equal(images, before)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    delta = out - images
    assert delta.abs().max() <= EPS + TOL
    assert torch.equal(out[~masks.expand_as(images)], images[~masks.expand_as(images)])
    changed = _changed_positions(out, images)
    assert changed.sum() <= masks.sum()
    assert not (changed & ~masks[:, 0]).any()
    assert changed.sum() > 0.9 * masks.sum()  # continuous noise changes (almost) every masked position
    # the noise fills the budget: both signs, close to +-eps somewhere
    assert delta.max() > 0.8 * EPS and delta.min() < -0.8 * EPS


def test_uniform_noise_clamps_at_range_edges():
    images = torch.zeros(4, 1, 6, 6)
    images[:2] = 1.0
    masks = torch.ones(4, 1, 6, 6, dtype=torch.bool)
    out = uniform_noise_in_mask(images, masks, 0.5)
    assert out.min() >= 0 and out.max() <= 1
    assert (out[:2] <= 1).all() and (out[2:] >= 0).all()
    assert (out - images).abs().max() <= 0.5 + TOL


def test_uniform_noise_determinism_and_broadcast_masks():
    images, _ = _data(2, channels=3)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)  # one mask for the whole batch
    mask[..., 2:5, 3:7] = True
    a = uniform_noise_in_mask(images, mask, EPS, seed=5)
    b = uniform_noise_in_mask(images, mask, EPS, seed=5)
    c = uniform_noise_in_mask(images, mask, EPS, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert _changed_positions(a, images).sum() <= images.shape[0] * 12
    # numpy inputs and a 0/1 float mask give the same result
    d = uniform_noise_in_mask(images.numpy(), mask.float().numpy(), EPS, seed=5)
    assert isinstance(d, torch.Tensor) and torch.equal(a, d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"masks": torch.ones(32, 1, 12, 11, dtype=torch.bool)}, "broadcast"),
        ({"masks": torch.ones(12, 12, dtype=torch.bool)}, "dimensions"),
        ({"masks": torch.full((32, 1, 12, 12), 0.5)}, "boolean"),
        ({"images": torch.full((2, 1, 12, 12), 1.5)}, r"\[0, 1\]"),
        ({"images": torch.zeros(2, 12, 12)}, "shaped"),
        ({"images": torch.zeros(2, 1, 12, 12, dtype=torch.uint8)}, "floating"),
    ],
)
def test_uniform_noise_errors(kwargs, match):
    images, _ = _data(2)
    args = {"images": images, "masks": torch.ones(32, 1, 12, 12, dtype=torch.bool), "epsilon": EPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        uniform_noise_in_mask(**args)


# ------------------------------------------------------------------------------------ error-minimizing noise
def _fit_loss(model_cls, dims, images, labels, steps=30, seed=0):
    """Training loss of a fresh model after ``steps`` full-batch SGD steps."""
    torch.manual_seed(seed)
    model = model_cls(dims, images.shape[1], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    return float(loss.detach())


EM_KW = {"max_rounds": 5, "train_steps": 5, "steps": 10, "batch_size": 16}


@pytest.mark.parametrize("dims", [2, 3])
def test_em_bounded_deterministic_and_learnable(dims, tiny_classifier):
    images, labels = _data(dims)  # random images, labels unrelated to content
    torch.manual_seed(1)
    net = tiny_classifier(dims, 1, 2)
    net_state = {k: v.clone() for k, v in net.state_dict().items()}
    before, labels_before = images.clone(), labels.clone()
    out, info = error_minimizing_noise(images, labels, 2, EPS, surrogate=net, seed=0, **EM_KW)
    # inputs untouched, the caller's module untouched (it is copied)
    assert torch.equal(images, before) and torch.equal(labels, labels_before)
    assert all(torch.equal(v, net_state[k]) for k, v in net.state_dict().items())
    # bounds and range
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().max() <= EPS + TOL
    assert (out != images).float().mean() > 0.5  # full-image perturbation
    assert set(info) >= {"rounds", "final_accuracy", "seconds"}
    assert 1 <= info["rounds"] <= EM_KW["max_rounds"] and len(info["accuracy_history"]) == info["rounds"]
    assert info["final_accuracy"] == info["accuracy_history"][-1]
    # the surrogate fits the protected data better than chance (labels are random w.r.t. the images)
    assert info["final_accuracy"] >= 0.9
    # the noise is a shortcut: a fresh model fits the protected set much faster than the clean one
    clean_loss = _fit_loss(tiny_classifier, dims, images, labels)
    protected_loss = _fit_loss(tiny_classifier, dims, out, labels)
    assert protected_loss < 0.5 * clean_loss
    # deterministic for a seed, different for another
    again, info2 = error_minimizing_noise(images, labels, 2, EPS, surrogate=net, seed=0, **EM_KW)
    assert torch.equal(out, again) and info2["accuracy_history"] == info["accuracy_history"]
    other, _ = error_minimizing_noise(images, labels, 2, EPS, surrogate=net, seed=1, **EM_KW)
    assert not torch.equal(out, other)


def test_em_stops_early_and_respects_custom_step(tiny_classifier):
    images, labels = _data(2)
    _, info = error_minimizing_noise(
        images, labels, 2, 0.3, surrogate=tiny_classifier(2, 1, 2), stop_accuracy=0.6, max_rounds=10,
        train_steps=5, batch_size=16, steps=5,
    )
    assert info["rounds"] < 10 and info["final_accuracy"] >= 0.6
    out, _ = error_minimizing_noise(
        images, labels, 2, EPS, surrogate=tiny_classifier(2, 1, 2), step_size=EPS / 100, steps=1,
        max_rounds=1, train_steps=1, batch_size=16,
    )
    # uniform start in [-eps, eps] plus one tiny step stays within the budget
    assert (out - images).abs().max() <= EPS + TOL


def test_em_named_surrogate_seeded_and_global_rng_untouched():
    images, labels = _data(2, n=8, channels=3)
    kw = {"max_rounds": 1, "train_steps": 1, "steps": 1, "batch_size": 8}
    rng = torch.get_rng_state()
    a, info = error_minimizing_noise(images, labels.reshape(-1, 1), 2, EPS, surrogate="resnet18", seed=4, **kw)
    assert torch.equal(rng, torch.get_rng_state())
    b, _ = error_minimizing_noise(images, labels, 2, EPS, surrogate="resnet18", seed=4, **kw)
    assert torch.equal(a, b) and info["rounds"] == 1
    assert (a - images).abs().max() <= EPS + TOL and a.min() >= 0 and a.max() <= 1


def test_em_batches_never_leave_a_single_sample():
    assert _slices(17, 16) == [slice(0, 17)]
    assert _slices(33, 16) == [slice(0, 16), slice(16, 33)]
    assert _slices(32, 16) == [slice(0, 16), slice(16, 32)]
    assert _slices(1, 16) == [slice(0, 1)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": torch.arange(32) % 3}, "labels must lie"),
        ({"labels": -(torch.arange(32) % 2)}, "labels must lie"),
        ({"labels": torch.zeros(31, dtype=torch.long)}, "shaped"),
        ({"labels": torch.zeros(32)}, "integer"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 2.0}, "epsilon"),
        ({"stop_accuracy": 0.0}, "stop_accuracy"),
        ({"steps": 0}, "steps"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"step_size": -0.1}, "step_size"),
        ({"lr": 0.0}, "lr"),
        ({"num_classes": 0}, "num_classes"),
        ({"images": torch.full((32, 1, 12, 12), -0.5)}, r"\[0, 1\]"),
        ({"surrogate": "nosuchnet"}, "unknown classifier"),
    ],
)
def test_em_errors(kwargs, match):
    images, labels = _data(2)
    args = {"images": images, "labels": labels, "num_classes": 2, "epsilon": EPS}
    args.update({"max_rounds": 1, "train_steps": 1, "steps": 1}, **kwargs)
    pos = [args.pop(k) for k in ("images", "labels", "num_classes", "epsilon")]
    with pytest.raises(ValueError, match=match):
        error_minimizing_noise(*pos, **args)


# ------------------------------------------------------------------------------------ one-pixel shortcut
def _brute_force_ops(images, labels, num_classes):
    """Reference OPS search with explicit loops (the authors' objective, distinct positions)."""
    n, c = images.shape[:2]
    flat = images.reshape(n, c, -1).double()
    taken, choice = set(), []
    for k in range(num_classes):
        xk = flat[labels == k]
        best = None
        for p in range(flat.shape[2]):
            if p in taken:
                continue
            for v in itertools.product((0.0, 1.0), repeat=c):
                d = (xk[:, :, p] - torch.tensor(v, dtype=torch.float64)).abs()
                score = float(d.mean() / max(float(d.std(unbiased=False)), 1e-6))
                if best is None or score > best[0] + 1e-9:
                    best = (score, p, v)
        taken.add(best[1])
        choice.append(best)
    return choice


@pytest.mark.parametrize("dims, channels, num_classes", [(2, 1, 2), (2, 3, 4), (3, 1, 3), (3, 2, 2)])
def test_ops_one_position_per_image(dims, channels, num_classes):
    # values strictly inside (0, 1): setting a corner value always changes the position
    images, labels = _data(dims, n=24, channels=channels, num_classes=num_classes, lo=0.05, hi=0.95)
    before = images.clone()
    out, info = one_pixel_shortcut(images, labels, num_classes)
    assert torch.equal(images, before)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert set(info) >= {"positions", "values", "seconds"}
    assert len(info["positions"]) == len(info["values"]) == num_classes
    assert len(set(info["positions"])) == num_classes  # distinct across classes
    changed = _changed_positions(out, images)
    assert changed.reshape(len(images), -1).sum(1).tolist() == [1] * len(images)
    for i, y in enumerate(labels.tolist()):
        pos, val = info["positions"][y], info["values"][y]
        assert len(pos) == dims and all(v in (0.0, 1.0) for v in val) and len(val) == channels
        assert changed[i][pos]  # the class's position, the same for every image of the class
        assert out[i][(slice(None), *pos)].tolist() == list(val)
    # unbounded in L-inf: the change is the distance to a corner, not a small budget
    assert (out - images).abs().max() > 0.5
    again, info2 = one_pixel_shortcut(images, labels, num_classes)
    assert torch.equal(out, again) and info2["positions"] == info["positions"]


@pytest.mark.parametrize("dims, channels", [(2, 2), (3, 1)])
def test_ops_matches_brute_force_objective(dims, channels):
    images, labels = _data(dims, n=20, channels=channels, num_classes=2, seed=3)
    if dims == 3:
        images = images[:, :, :4, :4, :4]
    _, info = one_pixel_shortcut(images, labels, 2)
    spatial = images.shape[2:]
    for k, (score, pos, val) in enumerate(_brute_force_ops(images, labels, 2)):
        assert info["positions"][k] == tuple(int(i) for i in np.unravel_index(pos, spatial))
        assert info["values"][k] == val
        assert info["scores"][k] == pytest.approx(score, rel=1e-6)


def test_ops_known_answer_constant_positions():
    images, labels = _data(2, n=16, lo=0.4, hi=0.6)
    images[labels == 0, 0, 3, 4] = 0.0  # constant dark pixel in class 0: push it to 1
    images[labels == 1, 0, 5, 6] = 1.0  # constant bright pixel in class 1: push it to 0
    out, info = one_pixel_shortcut(images, labels.reshape(-1, 1), 2)
    assert info["positions"] == [(3, 4), (5, 6)]
    assert info["values"] == [(1.0,), (0.0,)]
    assert (out[labels == 0, 0, 3, 4] == 1).all() and (out[labels == 1, 0, 5, 6] == 0).all()


def test_ops_ties_distinct_positions_and_absent_class():
    images = torch.zeros(6, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 3, 3])
    out, info = one_pixel_shortcut(images, labels, 4)
    # every position ties: lowest flat index first, never reused
    assert info["positions"] == [(0, 0), (0, 1), None, (0, 2)]
    assert info["values"] == [(1.0,), (1.0,), None, (1.0,)]
    assert out.dtype == torch.float64
    assert out[0, 0, 0, 0] == 1 and out[2, 0, 0, 1] == 1 and out[4, 0, 0, 2] == 1
    assert out.sum() == 6


def test_ops_noncontiguous_input():
    images, labels = _data(2, n=8, channels=3, lo=0.05, hi=0.95)
    view = images.permute(0, 1, 3, 2)  # non-contiguous
    out, _ = one_pixel_shortcut(view, labels, 2)
    assert _changed_positions(out, view).reshape(8, -1).sum(1).tolist() == [1] * 8


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.rand(4, 1, 2, 2), torch.arange(4), 3), "labels must lie"),
        ((torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 5), "distinct position"),
        ((torch.rand(4, 1, 3, 3), torch.zeros(3, dtype=torch.long), 2), "shaped"),
        ((torch.rand(4, 1, 3, 3), torch.zeros(4, dtype=torch.long), 0), "num_classes"),
        ((torch.rand(4, 3, 3), torch.zeros(4, dtype=torch.long), 2), "shaped"),
        ((torch.rand(4, 1, 3, 3) + 1, torch.zeros(4, dtype=torch.long), 2), r"\[0, 1\]"),
    ],
)
def test_ops_errors(args, match):
    with pytest.raises(ValueError, match=match):
        one_pixel_shortcut(*args)


def test_non_array_images_rejected():
    with pytest.raises(TypeError, match="tensor"):
        one_pixel_shortcut([[0.5]], torch.zeros(1, dtype=torch.long), 1)
