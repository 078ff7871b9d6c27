"""Countermeasures of an unauthorized trainer (``monai_salm.evaluation.countermeasures``).

Parsing (defaults, parameters, combinations, errors); the ISS-style preprocessing keeps shape, dtype and range,
never touches its input and removes or squeezes sparse noise; the MONAI augmentations keep shapes for 2D and 3D
inside ``monai.data.Dataset``/``DataLoader``; mixup mixes images and soft labels with the same weights; PGD stays
in the epsilon ball and in [0, 1], raises the loss and leaves the model as it found it.
"""

import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose

from monai_salm.evaluation.countermeasures import (
    COUNTERMEASURES,
    KINDS,
    Countermeasure,
    adversarial_training,
    augment_transforms,
    batch_transform,
    parse_countermeasures,
    pgd_attack,
    preprocess,
)

PREPROCESS = ["blur", "median", "bitdepth", "jpeg", "resample"]
AUGMENT = ["flip", "rotate", "crop", "cutout", "gamma", "intensity"]
SHAPES = {"2d-gray": (1, 16, 16), "2d-rgb": (3, 16, 16), "3d": (1, 8, 8, 8)}


def sparse_noise_images(shape, n=4, seed=0, eps=20 / 255, fraction=0.05):
    """Smooth images in [0, 1] with +-eps on a few isolated positions (what a SALM protection looks like)."""
    g = torch.Generator().manual_seed(seed)
    c, *spatial = shape
    coords = torch.meshgrid(*[torch.linspace(0, 1, s) for s in spatial], indexing="ij")
    base = 0.3 + 0.4 * sum(coords) / len(coords)
    clean = base.expand(n, c, *spatial).clone()
    mask = torch.rand(n, 1, *spatial, generator=g) < fraction
    sign = torch.where(torch.rand(n, c, *spatial, generator=g) < 0.5, -1.0, 1.0)
    return clean, (clean + eps * sign * mask).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- parsing


def test_registry_lists_every_name_with_a_default():
    assert set(COUNTERMEASURES) == set(PREPROCESS + AUGMENT + ["mixup", "adversarial"])
    for name, text in COUNTERMEASURES.items():
        assert "default" in text, name
        assert Countermeasure(name).kind in KINDS


def test_parse_defaults_params_and_order():
    cms = parse_countermeasures("median:5, MixUp ,flip,adversarial:8/255,jpeg:30,blur:0.5")
    assert [c.name for c in cms] == ["median", "mixup", "flip", "adversarial", "jpeg", "blur"]
    assert [c.kind for c in cms] == ["preprocess", "batch", "augment", "adversarial", "preprocess", "preprocess"]
    assert [c.param for c in cms] == [5.0, 1.0, 0.5, pytest.approx(8 / 255), 30.0, 0.5]
    assert parse_countermeasures("adversarial")[0].param == pytest.approx(8 / 255)
    assert parse_countermeasures("adversarial:0.03")[0].param == pytest.approx(0.03)
    assert parse_countermeasures(["median:3", "mixup,crop:2"]) == parse_countermeasures("median:3,mixup,crop:2")
    assert parse_countermeasures("median:3")[0] == Countermeasure("median", 3, "preprocess")
    assert parse_countermeasures(None) == parse_countermeasures("") == parse_countermeasures([]) == []
    # str() gives back a spec that parses to the same selection
    cms = parse_countermeasures("adversarial:8/255,cutout:6,bitdepth")
    assert [str(c) for c in cms] == ["adversarial:8/255", "cutout:6", "bitdepth:2"]
    assert parse_countermeasures(",".join(map(str, cms))) == cms


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sharpen", "valid names: flip, rotate"),
        ("median,foo:3", "'foo'"),
        ("median:4", "median.*odd"),
        ("median:abc", "median.*number"),
        ("bitdepth:0", "bitdepth"),
        ("bitdepth:2.5", "bitdepth"),
        ("jpeg:0", "jpeg"),
        ("resample:1", "resample"),
        ("cutout:1.5", "cutout"),
        ("flip:0", "flip"),
        ("gamma:1", "gamma"),
        ("adversarial:8/0", "adversarial"),
        ("adversarial:nan", "adversarial"),
        ("median,blur,median:5", "median.*more than once"),
    ],
)
def test_parse_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_countermeasures(spec)


def test_countermeasure_checks_kind_and_name():
    assert Countermeasure("mixup").param == 1.0
    with pytest.raises(ValueError, match="kind"):
        Countermeasure("mixup", None, "preprocess")
    with pytest.raises(ValueError, match="valid names"):
        Countermeasure("nope")


# ---------------------------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("name", PREPROCESS)
def test_preprocess_keeps_shape_range_and_changes_sparse_noise(name, layout):
    _, protected = sparse_noise_images(SHAPES[layout])
    before = protected.clone()
    cms = parse_countermeasures(name)
    if name == "jpeg" and layout == "3d":
        with pytest.raises(ValueError, match="2D"):
            preprocess(cms, protected)
        return
    out = preprocess(cms, protected)
    assert type(out) is torch.Tensor and out.shape == protected.shape and out.dtype == protected.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, protected)
    assert torch.equal(protected, before)  # input untouched


@pytest.mark.parametrize("layout", ["2d-gray", "3d"])
def test_median_removes_isolated_spikes_exactly(layout):
    c, *spatial = SHAPES[layout]
    flat = torch.full((2, c, *spatial), 0.5)
    spiky = flat.clone()
    spiky[(0, 0, *[2] * len(spatial))] += 20 / 255
    spiky[(1, 0, *[5] * len(spatial))] -= 20 / 255
    spiky[(1, 0, *[0] * len(spatial))] += 20 / 255  # a corner spike too (replicate padding)
    assert torch.equal(preprocess(parse_countermeasures("median:3"), spiky), flat)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_bitdepth_yields_2_to_the_b_levels(bits):
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = preprocess(parse_countermeasures(f"bitdepth:{bits}"), x)
    levels = torch.arange(2**bits) / (2**bits - 1)
    assert torch.equal(out.unique(), levels)
    assert (out - x).abs().max() <= 0.5 / (2**bits - 1) + 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_round_trips_shape_and_dtype(channels):
    x = torch.rand(3, channels, 20, 24, generator=torch.Generator().manual_seed(2)).double()
    out = preprocess(parse_countermeasures("jpeg:10"), x)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert torch.equal(torch.round(out * 255), out * 255)  # an 8-bit view
    # high quality on a smooth image is close to the input; low quality on noise is not
    smooth, _ = sparse_noise_images((channels, 20, 24))
    assert (preprocess(parse_countermeasures("jpeg:95"), smooth) - smooth).abs().mean() < 2 / 255
    assert (out - x).abs().mean() > 0.05


def test_jpeg_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="1 .*or 3"):
        preprocess(parse_countermeasures("jpeg"), torch.rand(2, 2, 8, 8))


@pytest.mark.parametrize("name", ["blur", "resample"])
@pytest.mark.parametrize("layout", ["2d-gray", "3d"])
def test_smoothing_reduces_a_spike_and_keeps_flat_images(name, layout):
    c, *spatial = SHAPES[layout]
    flat = torch.full((1, c, *spatial), 0.5)
    assert torch.allclose(preprocess(parse_countermeasures(name), flat), flat, atol=1e-4)  # no dark borders
    spiky = flat.clone()
    centre = (0, 0, *[4] * len(spatial))
    spiky[centre] = 1.0
    out = preprocess(parse_countermeasures(name), spiky)
    assert out[centre] < 0.5 + 0.5 * 0.5
    assert (out - flat).abs().max() < (spiky - flat).abs().max()


def test_preprocess_order_others_ignored_and_input_types():
    _, x = sparse_noise_images((1, 16, 16))
    same = preprocess(parse_countermeasures("mixup,flip,adversarial"), x)
    assert torch.equal(same, x) and same is not x and same.data_ptr() != x.data_ptr()
    cms = parse_countermeasures("blur,bitdepth:1")
    out = preprocess(cms, MetaTensor(x))
    assert type(out) is torch.Tensor and set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out, preprocess(cms[1:], preprocess(cms[:1], x)))
    with pytest.raises(ValueError, match="float tensor"):
        preprocess(cms, torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="float tensor"):
        preprocess(cms, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- augment


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 12), (1, 8, 8, 8), (1, 6, 8, 10)])
def test_augment_keeps_shape_and_range_in_a_dataloader(shape):
    spatial_dims = len(shape) - 1
    cms = parse_countermeasures(",".join(AUGMENT) + ",median,mixup")
    transforms = augment_transforms(cms, spatial_dims)
    assert len(transforms) > len(AUGMENT)
    g = torch.Generator().manual_seed(3)
    items = [{"image": torch.rand(shape, generator=g), "label": i % 2} for i in range(6)]
    dataset = Dataset(items, transform=Compose(transforms))
    seen = []
    for _ in range(2):
        for batch in DataLoader(dataset, batch_size=3, num_workers=0):
            assert batch["image"].shape == (3, *shape)
            assert batch["image"].min() >= 0 and batch["image"].max() <= 1
            assert batch["label"].tolist() in ([0, 1, 0], [1, 0, 1])
            seen.append(batch["image"].as_tensor())
    originals = torch.stack([item["image"] for item in items])
    assert not torch.equal(torch.cat(seen[:2]), originals)
    assert torch.equal(items[0]["image"], originals[0])  # items not modified in place


def test_augment_selection_and_errors():
    assert augment_transforms(parse_countermeasures("median,mixup,adversarial"), 2) == []
    with pytest.raises(ValueError, match="spatial_dims"):
        augment_transforms(parse_countermeasures("flip"), 4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flip_crop_cutout_behaviour(spatial_dims):
    spatial = (6, 8, 10)[-spatial_dims:]
    x = (torch.arange(1, 1 + torch.Size(spatial).numel()).float() / 1000).reshape(1, *spatial)
    flip = Compose(augment_transforms(parse_countermeasures("flip:1"), spatial_dims))
    assert torch.equal(flip({"image": x})["image"].as_tensor(), x.flip(list(range(1, spatial_dims + 1))))

    crop = Compose(augment_transforms(parse_countermeasures("crop:2"), spatial_dims)).set_random_state(0)
    for _ in range(3):  # a zero-filled integer shift by at most 2 px per axis
        y = crop({"image": x})["image"].as_tensor()
        kept = y[y > 0]
        assert set(kept.tolist()) <= set(x.flatten().tolist())
        assert kept.numel() >= torch.Size([s - 2 for s in spatial]).numel()

    cutout = Compose(augment_transforms(parse_countermeasures("cutout:0.5"), spatial_dims))
    hole = cutout({"image": torch.ones(1, *spatial)})["image"] == 0
    assert int(hole.sum()) == torch.Size([s // 2 for s in spatial]).numel()
    cutout_px = Compose(augment_transforms(parse_countermeasures("cutout:3"), spatial_dims))
    assert int((cutout_px({"image": torch.ones(1, *spatial)})["image"] == 0).sum()) == 3**spatial_dims


# ---------------------------------------------------------------------------------------------- mixup


@pytest.mark.parametrize("spatial", [(8, 8), (4, 4, 4)])
def test_mixup_soft_labels_and_images(spatial):
    num_classes = 4
    assert batch_transform(parse_countermeasures("flip,median"), num_classes) is None
    mix = batch_transform(parse_countermeasures("mixup:0.4"), num_classes, seed=0)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    x = y.float().view(-1, 1, *[1] * len(spatial)).expand(-1, 2, *spatial).clone() / 3  # image value codes its class
    mixed, soft = mix(x, y)
    assert mixed.shape == x.shape and soft.shape == (len(y), num_classes)
    assert torch.allclose(soft.sum(1), torch.ones(len(y)))
    assert soft.min() >= 0
    # the images are mixed with the same weights as the labels
    expected = (soft * torch.arange(num_classes) / 3).sum(1)
    assert torch.allclose(mixed.flatten(1).mean(1), expected, atol=1e-6)
    assert torch.allclose(mixed.flatten(1).std(1), torch.zeros(len(y)), atol=1e-6)
    assert not torch.equal(mixed, x)
    # reproducible with a seed, different on the next call, any batch size
    again, _ = batch_transform(parse_countermeasures("mixup:0.4"), num_classes, seed=0)(x, y)
    assert torch.equal(again, mixed)
    assert not torch.equal(mix(x, y)[0], mixed)
    assert mix(x[:3], y[:3])[1].shape == (3, num_classes)
    with pytest.raises(ValueError, match="integer labels"):
        mix(x, F.one_hot(y, num_classes))


# ---------------------------------------------------------------------------------------------- adversarial


def test_adversarial_training_settings():
    assert adversarial_training(parse_countermeasures("mixup,flip")) is None
    cfg = adversarial_training(parse_countermeasures("adversarial:4/255,flip"))
    assert cfg["epsilon"] == pytest.approx(4 / 255) and cfg["steps"] >= 1
    assert cfg["step_size"] == pytest.approx(2.5 * cfg["epsilon"] / cfg["steps"])
    assert adversarial_training(parse_countermeasures("adversarial"))["epsilon"] == pytest.approx(8 / 255)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("train_mode", [True, False])
def test_pgd_attack_bounded_increases_loss_and_restores_model(tiny_classifier, spatial_dims, train_mode):
    torch.manual_seed(0)
    model = tiny_classifier(spatial_dims, 1, 3)
    model.train(train_mode)
    model.net[0].weight.requires_grad_(False)  # a frozen layer stays frozen, the others trainable
    stats = model.net[1].running_mean.clone()
    x = torch.rand(8, 1, *[8] * spatial_dims)
    x[0] = 0.0
    x[1] = 1.0
    y = torch.randint(0, 3, (8,))
    eps = 8 / 255
    cfg = adversarial_training(parse_countermeasures(f"adversarial:{eps}"))
    x_adv = pgd_attack(model, x, y, **cfg)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    model.train(train_mode)
    # model left as found: modes, requires_grad, BatchNorm statistics, no parameter gradients
    assert all(m.training == train_mode for m in model.modules())
    assert not model.net[0].weight.requires_grad and model.net[-1].weight.requires_grad
    assert torch.equal(model.net[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_attack_soft_labels_random_start_and_errors(tiny_classifier):
    torch.manual_seed(1)
    model = tiny_classifier(2, 3, 4)
    x = torch.rand(4, 3, 8, 8)
    soft = torch.softmax(torch.randn(4, 4), 1)
    with torch.no_grad():  # works inside a no-grad block too
        x_adv = pgd_attack(model, x, soft, epsilon=0.05, steps=2, step_size=0.02)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and not torch.equal(x_adv, x)
    start = pgd_attack(model, x, soft.argmax(1), epsilon=0.05, steps=0, step_size=0.0)
    assert 0 < (start - x).abs().max() <= 0.05 + 1e-6
    assert torch.equal(pgd_attack(model, x, soft, epsilon=0.0, steps=3, step_size=0.01), x)
    with pytest.raises(ValueError, match=">= 0"):
        pgd_attack(model, x, soft, epsilon=-0.1, steps=1, step_size=0.01)
