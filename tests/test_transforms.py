import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

from monai_salm.networks import NoiseGenerator
from monai_salm.transforms import (
    ApplyUnlearnableNoise,
    ApplyUnlearnableNoised,
    ApplyUnlearnableNoiseD,
    ApplyUnlearnableNoiseDict,
    SaliencyMask,
    SaliencyMaskd,
    SaliencyMaskD,
    SaliencyMaskDict,
)

from conftest import TinyClassifier

EPS = 0.05
CASES = [(2, 1, (12, 10)), (2, 3, (12, 10)), (3, 1, (6, 8, 7)), (3, 3, (6, 8, 7))]
TYPES = ["numpy", "torch", "meta"]


def _image(kind, channels, spatial, seed=0):
    arr = np.random.default_rng(seed).random((channels, *spatial)).astype(np.float32)
    if kind == "numpy":
        return arr
    if kind == "torch":
        return torch.from_numpy(arr)
    return MetaTensor(torch.from_numpy(arr), affine=torch.diag(torch.tensor([2.0] * len(spatial) + [1.0])), meta={"filename_or_obj": "scan.nii.gz"})


def _models(spatial_dims, channels, num_classes=3, conditioned=True):
    torch.manual_seed(0)
    model = TinyClassifier(spatial_dims, channels, num_classes)
    gen = NoiseGenerator(spatial_dims, channels, num_classes if conditioned else 0, channels=(4, 8, 16))
    return model, gen


def _reference_saliency(model, img, label):
    x = torch.as_tensor(np.asarray(img)).float()[None].requires_grad_(True)
    was = model.training
    model.eval()
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([label]), reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    model.train(was)
    return g.abs().sum(1)[0]


def test_aliases():
    assert SaliencyMaskD is SaliencyMaskDict is SaliencyMaskd
    assert ApplyUnlearnableNoiseD is ApplyUnlearnableNoiseDict is ApplyUnlearnableNoised
    assert SaliencyMask.backend and ApplyUnlearnableNoise.backend


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("spatial_dims, channels, spatial", CASES)
@pytest.mark.parametrize("k", [0.1, 0.25, 7])
def test_mask_count_positions_and_type(kind, spatial_dims, channels, spatial, k):
    model, _ = _models(spatial_dims, channels)
    img = _image(kind, channels, spatial)
    mask = SaliencyMask(model, k)(img, 1)
    n = int(np.prod(spatial))
    expected = k if isinstance(k, int) else round(k * n)
    assert tuple(mask.shape) == (1, *spatial)
    assert type(mask) is type(img)
    m = torch.as_tensor(np.asarray(mask))[0].bool()
    assert int(m.sum()) == expected
    ref = _reference_saliency(model, img, 1)
    assert ref[m].min() >= ref[~m].max()


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("spatial_dims, channels, spatial", CASES)
@pytest.mark.parametrize("conditioned", [True, False])
def test_noise_bounded_in_mask_and_range(kind, spatial_dims, channels, spatial, conditioned):
    model, gen = _models(spatial_dims, channels, conditioned=conditioned)
    img = _image(kind, channels, spatial)
    data = {"image": img, "label": 2}
    data = SaliencyMaskd("image", "label", model, 0.2)(data)
    out = ApplyUnlearnableNoised("image", generator=gen, epsilon=EPS, label_key="label" if conditioned else None)(data)
    protected = out["image"]
    assert type(protected) is type(img)
    diff = np.abs(np.asarray(protected, dtype=np.float64) - np.asarray(img, dtype=np.float64))
    mask = np.asarray(out["salm_mask"]).astype(bool)
    assert diff.max() <= EPS + 1e-6
    assert diff[:, ~mask[0]].max() == 0.0
    assert diff[:, mask[0]].max() > 0
    assert np.asarray(protected).min() >= 0.0 and np.asarray(protected).max() <= 1.0


def test_metadata_kept():
    model, gen = _models(2, 1)
    img = _image("meta", 1, (12, 10))
    out = Compose([SaliencyMaskd("image", "label", model, 0.1), ApplyUnlearnableNoised("image", generator=gen, epsilon=EPS, label_key="label")])(
        {"image": img, "label": 0}
    )
    for key in ("image", "salm_mask"):
        assert isinstance(out[key], MetaTensor)
        assert out[key].meta["filename_or_obj"] == "scan.nii.gz"
        assert torch.equal(out[key].affine, img.affine)


def test_model_state_untouched_and_deterministic():
    model, gen = _models(2, 3)
    model.train()
    gen.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad.clone() for p in model.parameters()]
    bn_before = model.net[1].running_mean.clone()
    img = _image("torch", 3, (12, 10))
    t = Compose([SaliencyMaskd("image", "label", model, 0.1), ApplyUnlearnableNoised("image", generator=gen, epsilon=EPS, label_key="label")])
    a = t({"image": img, "label": 1})
    b = t({"image": img, "label": 1})
    assert model.training and gen.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.net[1].running_mean, bn_before)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["salm_mask"], b["salm_mask"])
    model.eval()
    SaliencyMask(model, 0.1)(img, 1)
    assert not model.training


def test_bad_arguments():
    model, gen = _models(2, 1)
    img = _image("torch", 1, (12, 10))
    for k in (0.0, 1.5, 0, 121, -3):
        with pytest.raises(ValueError, match="k"):
            SaliencyMask(model, k)(img, 0)
    with pytest.raises(ValueError, match="epsilon"):
        ApplyUnlearnableNoise(gen, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        ApplyUnlearnableNoise(gen, epsilon=2.0)
    with pytest.raises(ValueError, match="label"):
        ApplyUnlearnableNoise(gen, epsilon=0.1)(img, torch.ones(1, 12, 10))
    with pytest.raises(ValueError, match="mask shape"):
        ApplyUnlearnableNoise(gen, epsilon=0.1)(img, torch.ones(1, 5, 5), 0)
    with pytest.raises(ValueError, match="channel-first"):
        SaliencyMask(model, 0.1)(torch.rand(12, 10), 0)


def test_allow_missing_keys():
    model, gen = _models(2, 1)
    data = {"label": 0}
    assert SaliencyMaskd("image", "label", model, 0.1, allow_missing_keys=True)(data) == data
    assert ApplyUnlearnableNoised("image", generator=gen, epsilon=0.1, allow_missing_keys=True)(data) == data
    with pytest.raises(KeyError):
        SaliencyMaskd("image", "label", model, 0.1)(data)


def test_class_scores_mask():
    scores = torch.zeros(2, 4, 4)
    scores[1, 0, 0] = scores[1, 3, 3] = 1.0
    mask = SaliencyMask(None, 2, class_scores=scores)(np.zeros((1, 4, 4), np.float32), 1)
    assert mask[0, 0, 0] == 1 and mask[0, 3, 3] == 1 and mask.sum() == 2


@pytest.mark.parametrize("spatial", [(14, 12), (8, 10, 6)])
def test_pipeline_on_real_nifti(tmp_path, spatial):
    rng = np.random.default_rng(3)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 20]
    files = []
    for i in range(4):
        f = tmp_path / f"scan{i}.nii.gz"
        nib.save(nib.Nifti1Image((rng.random(spatial) * 1000 - 200).astype(np.int16), affine), f)
        files.append({"image": str(f), "label": i % 2})
    sd = len(spatial)
    model, gen = _models(sd, 1, num_classes=2)
    pipeline = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            ScaleIntensityd("image", minv=0.0, maxv=1.0),
            SaliencyMaskd("image", "label", model, 0.1),
            ApplyUnlearnableNoised("image", generator=gen, epsilon=EPS, label_key="label"),
        ]
    )
    loader = DataLoader(Dataset(files, transform=pipeline), batch_size=2)
    batches = list(loader)
    assert len(batches) == 2
    img = batches[0]["image"]
    assert tuple(img.shape) == (2, 1, *spatial)
    assert batches[0]["salm_mask"].sum(dim=tuple(range(1, sd + 2))).tolist() == [round(0.1 * np.prod(spatial))] * 2
    assert np.allclose(img.affine[0].numpy(), affine)
    assert img.meta["filename_or_obj"][0].endswith("scan0.nii.gz")
    clean = ScaleIntensityd("image", minv=0.0, maxv=1.0)(EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)(files[0])))["image"]
    diff = (img[0] - clean).abs()
    assert diff.max() <= EPS + 1e-6
    assert diff[~batches[0]["salm_mask"][0].bool().expand_as(diff)].max() == 0
