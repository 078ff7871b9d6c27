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
