import pytest
import torch

from monai_salm.networks import NoiseGenerator, build_classifier, sign_code


@pytest.mark.parametrize("spatial_dims, shape", [(2, (3, 28, 28)), (2, (1, 27, 29)), (3, (1, 28, 28, 28)), (3, (1, 13, 14, 15))])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_generator_shapes(spatial_dims, shape, num_classes):
    gen = NoiseGenerator(spatial_dims, shape[0], num_classes, channels=(4, 8, 16))
    x = torch.rand(2, *shape)
    y = torch.tensor([0, 2]) if num_classes else None
    assert gen.label_conditioned == bool(num_classes)
    assert gen(x, y).shape == x.shape


def test_generator_needs_labels_when_conditioned():
    gen = NoiseGenerator(2, 1, 2, channels=(4, 8, 16))
    with pytest.raises(ValueError, match="label"):
        gen(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="class indices"):
        gen(torch.rand(1, 1, 8, 8), torch.tensor([5]))


def test_generator_rejects_bad_dims():
    with pytest.raises(ValueError, match="spatial_dims"):
        NoiseGenerator(4, 1)


def test_sign_code_distinct():
    assert torch.unique(sign_code(8, 3), dim=0).shape[0] == 8
    assert sign_code(2, 1).flatten().tolist() == [-1.0, 1.0]
    assert torch.unique(sign_code(5, 1), dim=0).shape[0] == 5


@pytest.mark.parametrize("spatial_dims, shape", [(2, (3, 28, 28)), (3, (1, 16, 16, 16))])
def test_classifier_factory(spatial_dims, shape):
    net = build_classifier("resnet18", spatial_dims, shape[0], 4)
    assert net(torch.rand(2, *shape)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("alexnet", 2, 1, 2)


@pytest.mark.parametrize("num_classes, size", [(2, (28, 28)), (8, (28, 28)), (11, (16, 16)), (5, (8, 8, 8))])
def test_class_textures_are_distinct_local_and_flip_stable(num_classes, size):
    from monai_salm.networks.generator import class_textures

    t = class_textures(num_classes, 3, size)
    assert t.shape == (num_classes, 3, *size) and set(t.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(t[:, 0], t[:, 2])  # every channel the same
    flat = t[:, 0].flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == num_classes  # one texture per class
    # binary sets: stripes of period 4 across one axis and the other
    if num_classes == 2:
        assert torch.equal(t[0, 0, :4, 0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
        assert torch.equal(t[1, 0], t[0, 0].T)
    # shifting by a period leaves a period-4 texture unchanged (interior), and flips keep it when 4 divides the size
    first = t[0, 0]
    assert torch.equal(first[4:], first[:-4])
    if all(s % 4 == 0 for s in size):
        assert torch.equal(first.flip(0), first)


def test_class_textures_are_exact_square_waves():
    # period 2 and 6 put the cosine's zeros on pixel positions; their sign must not follow float rounding
    from monai_salm.networks.generator import _TEXTURE_PERIODS, class_textures

    size = (30, 30)
    t = class_textures(21, 1, size)[:, 0]
    for c in range(21):
        period = _TEXTURE_PERIODS[c // 3]
        for axis in (0, 1):  # the same after a shift by its period along every axis
            rest = size[axis] - period
            assert torch.equal(t[c].narrow(axis, period, rest), t[c].narrow(axis, 0, rest))
        if period % 2 == 0:  # half a period inverts it along the axis it varies on
            axis = 1 if c % 3 == 1 else 0
            half = period // 2
            assert torch.equal(t[c].narrow(axis, half, size[axis] - half), -t[c].narrow(axis, 0, size[axis] - half))
    assert torch.equal(t[3, :6, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]))  # period 2, rows


def test_texture_generator_saturates_at_the_texture():
    from monai_salm.networks.generator import class_textures

    torch.manual_seed(0)
    g = NoiseGenerator(2, 1, num_classes=2, pattern_size=(16, 16), pattern_kind="texture")
    y = torch.tensor([0, 1, 1])
    out = torch.tanh(g(torch.rand(3, 1, 16, 16), y))  # the UNet's few units cannot move tanh(+-10)
    assert torch.allclose(out, class_textures(2, 1, (16, 16))[y], atol=1e-3)
    assert "class_code" in dict(g.named_buffers()) and "class_code" not in dict(g.named_parameters())
    with pytest.raises(ValueError, match="pattern_kind"):
        NoiseGenerator(2, 1, num_classes=2, pattern_size=(16, 16), pattern_kind="stripes")
    with pytest.raises(ValueError, match="texture pattern needs"):
        NoiseGenerator(2, 1, num_classes=2, pattern_kind="texture")


def test_texture_checkpoint_protects_with_the_texture(tmp_path):
    import numpy as np
    from conftest import make_medmnist

    from monai_salm.cli import main
    from monai_salm.engines import load_protection

    data, ckpt, out = tmp_path / "d.npz", tmp_path / "t.pt", tmp_path / "r.npz"
    make_medmnist(data, n=32, shape=(16, 16))
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--pattern", "texture", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "8", "--quiet"]) == 0
    settings, generator, _, scores = load_protection(ckpt)
    assert settings.generator["pattern_kind"] == "texture" and generator.pattern_kind == "texture"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    clean, protected = np.load(data), np.load(out)
    eps = round(settings.epsilon * 255)
    delta = protected["train_images"].astype(int) - clean["train_images"].astype(int)
    labels = clean["train_labels"].reshape(-1)
    from monai_salm.networks.generator import class_textures
    from monai_salm.transforms.functional import topk_mask

    masks = topk_mask(scores, settings.k).bool()[torch.as_tensor(labels).long()][:, 0].numpy()
    sign = class_textures(2, 1, (16, 16))[torch.as_tensor(labels).long(), 0].numpy()
    assert (delta[~masks] == 0).all()
    inside = delta[masks]
    room = (clean["train_images"][masks].astype(int) + sign[masks].astype(int) * eps).clip(0, 255)
    assert (inside == room - clean["train_images"][masks]).all()  # +-eps with the class's texture sign, clipped
