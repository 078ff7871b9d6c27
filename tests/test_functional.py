import pytest
import torch

from monai_salm.transforms import perturb, resolve_k, topk_mask


@pytest.mark.parametrize("k, n, expected", [(0.1, 784, 78), (0.5, 10, 5), (1.0, 7, 7), (1, 7, 1), (7, 7, 7), (0.05, 21952, 1098)])
def test_resolve_k(k, n, expected):
    assert resolve_k(k, n) == expected


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, 0, 8, True, "0.1", None, 0.001])
def test_resolve_k_rejects(k):
    with pytest.raises(ValueError, match="k"):
        resolve_k(k, 7)


def test_topk_mask_exact_count_and_positions():
    scores = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(scores, 0.2)
    assert mask.shape == (3, 1, 5, 6)
    assert mask.sum(dim=(1, 2, 3)).tolist() == [6.0, 6.0, 6.0]
    for s, m in zip(scores, mask[:, 0]):
        assert s[m.bool()].min() > s[~m.bool()].max()


def test_topk_mask_ties_take_lowest_flat_index():
    scores = torch.zeros(1, 4, 4)
    scores[0, 3, 3] = 1.0
    mask = topk_mask(scores, 3)[0, 0].flatten()
    assert mask.nonzero().flatten().tolist() == [0, 1, 15]


def test_perturb_bounded_and_mask_restricted():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=gen)
    mask = topk_mask(torch.rand(2, 8, 8, generator=gen), 0.25)
    raw = 10 * torch.randn(2, 3, 8, 8, generator=gen)
    out = perturb(x, mask, raw, 0.1, (0.0, 1.0))
    diff = (out - x).abs()
    assert diff.max() <= 0.1 + 1e-6
    assert (diff * (1 - mask)).max() == 0
    assert out.min() >= 0 and out.max() <= 1
    assert (diff > 0).any()


def test_batchnorm_statistics_sets_only_batch_norm_to_train_mode():
    from monai_salm.transforms.functional import batchnorm_statistics

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, momentum=0.3), torch.nn.Dropout(0.5))
    net.train()
    x = torch.randn(6, 1, 5, 5)
    with batchnorm_statistics(net):
        assert net[1].training and not net[0].training and not net[2].training and net[1].momentum is None
        out = net(x)
    torch.testing.assert_close(net[1].running_mean, net[0](x).mean(dim=(0, 2, 3)))
    assert int((out == 0).sum()) < out.numel() // 4  # no dropout while the statistics are gathered
    assert net[1].momentum == 0.3 and all(m.training for m in net.modules())


def test_recalibrate_batchnorm_skips_a_lone_last_image():
    from monai_salm.transforms.functional import recalibrate_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    x = torch.randn(5, 1, 6, 6) * 3 + 2
    recalibrate_batchnorm(net, [x[:4], x[4:]])  # a batch of one cannot give batch statistics
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ref.load_state_dict(net.state_dict())
    recalibrate_batchnorm(ref, [x[:4]])
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
    assert not net.training or net.training == ref.training
