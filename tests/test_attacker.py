"""The competent attacker (recipes, budget, validation-selected epoch, readers), whole-release protection, the PSNR
budget and block-shaped masks and patterns."""

import json
import math

import numpy as np
import pytest
import torch

from monai_salm.api import DEFAULTS, protection_stats, train_salm
from monai_salm.cli import main
from monai_salm.data import structural_similarity
from monai_salm.engines import load_protection, protection_transforms
from monai_salm.evaluation import RECIPES, classification_metrics, train_victim
from monai_salm.evaluation.victim import predict_probabilities, recipe_epochs, relabel_map, select_epoch
from monai_salm.networks import NoiseGenerator
from monai_salm.transforms.functional import block_average, epsilon_for_psnr, flip_average, regional_rank, topk_mask

from conftest import make_medmnist


def _separable(n=48, shape=(12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, *shape, generator=g) * 0.4 + y.view(-1, *[1] * (len(shape) + 1)) * 0.5).clamp(0, 1)
    return x, y


def test_recipe_budget_in_steps():
    # BreastMNIST: 546 // 128 = 4 steps an epoch, the 100-epoch protocol fits under 4000 steps
    assert recipe_epochs(546, 128, 100, 4000) == 100
    # BloodMNIST: 11959 // 128 = 93 steps an epoch, capped at ceil(4000 / 93) = 44 epochs
    assert recipe_epochs(11959, 128, 100, 4000) == 44
    assert recipe_epochs(10, 128, 100, 4000) == 100  # one (partial) batch an epoch
    assert recipe_epochs(11959, 128, 20, None) == 20
    assert RECIPES["competent"]["schedule"] == "multistep" and RECIPES["quick"]["schedule"] == "cosine"


def test_select_epoch_takes_best_validation_auc_earliest_on_ties():
    history = [{"epoch": e, "val": {"v": {"auc": a, "accuracy": 0.5}}} for e, a in enumerate([0.6, 0.8, 0.7, 0.8], 1)]
    assert select_epoch(history, "v")["epoch"] == 2


def test_competent_victim_selects_on_validation(tiny_classifier):
    x, y = _separable()
    vx, vy = _separable(16, seed=1)
    bad_val = (vx, 1 - vy)  # a validation set with flipped labels prefers the worst epoch
    report = train_victim(x, y, x[:16], y[:16], 2, val_sets={"good": (vx, vy), "flipped": bad_val}, epochs=4,
                          network=tiny_classifier(2, 1, 2), batch_size=16, lr=1e-2, keep_model=True)
    assert set(report["selected"]) == {"good", "flipped", "good_relabeled", "flipped_relabeled"}
    for name, sel in report["selected"].items():
        expected = select_epoch(report["history"], name)
        test = expected["relabeled"].get(name, expected)  # a relabelling attacker reads relabelled test outputs
        assert sel["epoch"] == expected["epoch"] and sel["auc"] == test["auc"]
    worst = max(report["selected"], key=lambda n: report["selected"][n]["auc"])  # binary: AUC decides
    assert report["selected_by"] == worst
    assert report["selected_auc"] == report["selected"][worst]["auc"]
    assert report["recipe"]["name"] == "competent" and report["recipe"]["schedule"] == "multistep"
    assert report["recipe"]["shift"] == 2 and report["recipe"]["epochs"] == 4
    # the kept model is the selected epoch's
    kept = classification_metrics(predict_probabilities(report["model"], x[:16], "cpu"), y[:16])
    assert kept["auc"] == pytest.approx(report["selected_auc"])


def test_relabel_map_reads_a_consistently_wrong_model():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    permuted = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 0.9 + 0.1 / 3  # says c + 1 for class c
    relabelled = permuted @ relabel_map(permuted, labels)
    assert torch.equal(relabelled.argmax(1), labels)
    assert classification_metrics(permuted, labels)["accuracy"] == 0.0
    scores = torch.tensor([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])  # ranks class 0 above class 1
    binary = torch.tensor([0, 1, 0, 1])
    assert torch.equal(relabel_map(scores, binary), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert classification_metrics(scores @ relabel_map(scores, binary), binary)["auc"] == 1.0
    assert torch.equal(relabel_map(scores, 1 - binary), torch.eye(2))  # a right ranking is kept


def test_relabeling_attacker_recovers_an_inverted_rule(tiny_classifier):
    x, y = _separable()
    vx, vy = _separable(16, seed=1)
    # a release that teaches the opposite rule: the victim's raw clean AUC is low, yet it has learned the task
    report = train_victim(x, 1 - y, vx, vy, 2, val_sets={"clean_val": (vx, vy)}, epochs=3,
                          network=tiny_classifier(2, 1, 2), batch_size=16, lr=1e-2)
    raw, relabeled = report["selected"]["clean_val"], report["selected"]["clean_val_relabeled"]
    assert raw["auc"] < 0.5 < relabeled["auc"]
    assert report["selected_by"] == "clean_val_relabeled" and report["selected_auc"] == relabeled["auc"]
    for epoch in report["history"]:
        assert epoch["relabeled"]["clean_val_relabeled"]["auc"] == pytest.approx(max(epoch["auc"], 1 - epoch["auc"]))


def test_victim_defaults_batch_by_dimension(tiny_classifier):
    x, y = _separable(8, shape=(8, 8, 8))
    report = train_victim(x, y, x, y, 2, epochs=1, network=tiny_classifier(3, 1, 2))
    assert report["recipe"]["batch_size"] == 32 and "selected" not in report


def test_victim_rejects_unknown_recipe_and_schedule(tiny_classifier):
    x, y = _separable()
    with pytest.raises(ValueError, match="recipe"):
        train_victim(x, y, x, y, 2, recipe="strong", network=tiny_classifier(2, 1, 2))
    with pytest.raises(ValueError, match="schedule"):
        train_victim(x, y, x, y, 2, epochs=1, schedule="step", network=tiny_classifier(2, 1, 2))


def test_epsilon_for_psnr_meets_the_target_exactly_without_clipping():
    k, positions = 0.05, 28 * 28
    eps = epsilon_for_psnr(32.0, k, positions)
    clean = torch.full((4, 1, 28, 28), 0.5)
    mask = topk_mask(torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(0)), k)
    protected = clean + mask * eps  # every masked value moves by the full epsilon
    assert protection_stats(clean, protected, data_range=1.0)["psnr_db"] == pytest.approx(32.0, abs=1e-4)
    assert epsilon_for_psnr(10.0, 1.0, positions) == pytest.approx(10 ** (-0.5))
    assert epsilon_for_psnr(1.0, 1.0, positions) <= 1.0
    with pytest.raises(ValueError, match="psnr"):
        epsilon_for_psnr(0.0, k, positions)


def test_train_psnr_budget_and_whole_release(tmp_path, capsys):
    data = tmp_path / "d.npz"
    arrays = make_medmnist(data, n=32, shape=(16, 16))
    ckpt = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1", "--warmup-epochs", "0",
                 "--k", "0.1", "--psnr", "34", "--batch-size", "16", "--quiet"]) == 0
    settings = load_protection(ckpt)[0]
    # 26 of 256 positions: epsilon = 10^(-34/20) / sqrt(26/256) = 0.0626, rounded down to whole 8-bit steps
    exact = epsilon_for_psnr(34.0, 0.1, 256)
    assert settings.epsilon == pytest.approx(math.floor(exact * 255) / 255)
    out = tmp_path / "release.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) >= {"train", "val", "test"}  # every split of the release is protected by default
    with np.load(out) as f:
        for split in ("train", "val", "test"):
            clean, prot = arrays[f"{split}_images"].astype(int), f[f"{split}_images"].astype(int)
            assert (clean != prot).any() and np.abs(clean - prot).max() <= round(settings.epsilon * 255)
            assert report[split]["psnr_db"] >= 34.0 and 0.5 < report[split]["ssim"] < 1.0
    only_train = tmp_path / "train_only.npz"
    assert main(["protect", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(only_train), "--splits",
                 "train", "--quiet"]) == 0
    with np.load(only_train) as f:
        np.testing.assert_array_equal(f["test_images"], arrays["test_images"])
        np.testing.assert_array_equal(f["val_images"], arrays["val_images"])


def test_structural_similarity():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    assert structural_similarity(clean, clean) == pytest.approx(1.0)
    noisy = np.clip(clean.astype(int) + rng.integers(-40, 41, clean.shape), 0, 255).astype(np.uint8)
    mild = np.clip(clean.astype(int) + rng.integers(-4, 5, clean.shape), 0, 255).astype(np.uint8)
    assert structural_similarity(clean, noisy) < structural_similarity(clean, mild) < 1.0
    volumes = rng.integers(0, 256, (2, 12, 12, 12), dtype=np.uint8)
    assert structural_similarity(volumes, volumes) == pytest.approx(1.0)
    mild_volumes = np.clip(volumes.astype(int) + rng.integers(-4, 5, volumes.shape), 0, 255).astype(np.uint8)
    # the mean over images does not depend on how many go through the metric at once
    assert structural_similarity(volumes, mild_volumes, batch_size=1) == pytest.approx(
        structural_similarity(volumes, mild_volumes))


def test_evaluate_reports_selection_release_and_readers(tmp_path):
    data = tmp_path / "d.npz"
    make_medmnist(data, n=32, shape=(16, 16))
    out = tmp_path / "report"
    assert main(["evaluate", "--train", str(data), "--test", str(data), "--epochs", "2", "--victim", "vit",
                 "--reader-data", str(data), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation"] == {"protected_val": 8, "clean_val": 8}
    assert report["release_splits"] == {"train": 32, "val": 8, "test": 8}
    assert report["selected_by"] in ("protected_val", "clean_val") and 1 <= report["selected_epoch"] <= 2
    reader = report["reader"][str(data)]
    assert reader["accuracy_change"] == 0.0 and reader["clean_accuracy"] == reader["protected_accuracy"]
    assert "headline" in (out / "summary.md").read_text()
    assert main(["evaluate", "--train", str(data), "--test", str(data), "--epochs", "1", "--victim", "vit",
                 "--val-from", "none", "--out", str(tmp_path / "none"), "--quiet"]) == 0
    assert "selected" not in json.loads((tmp_path / "none" / "report.json").read_text())


@pytest.mark.parametrize("spatial", [(6, 6), (6, 6, 6)])
def test_block_average_makes_masks_of_whole_cells(spatial):
    scores = torch.rand(2, *spatial, generator=torch.Generator().manual_seed(0))
    pooled = block_average(scores, 3)
    assert pooled.shape == scores.shape
    # first cell: the mean of its 3x3(x3) positions everywhere in it
    cell = (slice(None), *[slice(0, 3)] * len(spatial))
    first = scores[cell].reshape(2, -1).mean(1)
    assert torch.allclose(pooled[cell].reshape(2, -1), first[:, None].expand(2, 3 ** len(spatial)))
    count = 3 ** len(spatial)
    mask = topk_mask(pooled, count)  # exactly one whole cell
    assert int(mask[0].sum()) == count
    nonzero = mask[0, 0].nonzero()
    assert (nonzero.max(0).values - nonzero.min(0).values == 2).all()
    assert torch.equal(block_average(scores, 1), scores)
    assert block_average(torch.rand(1, 5, 7), 3).shape == (1, 5, 7)  # partial cells at the far edges
    with pytest.raises(ValueError, match="block"):
        block_average(scores, 0)


def test_generator_pattern_cells_are_constant_and_flip_symmetric():
    gen = NoiseGenerator(2, 1, num_classes=3, pattern_size=(12, 12), pattern_cell=4)
    pattern = gen.class_pattern()
    assert pattern.shape == (3, 1, 12, 12) and gen.class_code.shape == (3, 1, 3, 3)
    blocks = pattern.reshape(3, 1, 3, 4, 3, 4)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert torch.equal(pattern, pattern.flip(2)) and torch.equal(pattern, pattern.flip(3))
    out = gen(torch.rand(2, 1, 12, 12), torch.tensor([0, 2]))
    assert out.shape == (2, 1, 12, 12)
    with pytest.raises(ValueError, match="pattern_cell"):
        NoiseGenerator(2, 1, num_classes=3, pattern_size=(12, 12), pattern_cell=0)


def test_flip_average_with_rotations_is_invariant_under_quarter_turns():
    maps = torch.rand(2, 6, 6)
    sym = flip_average(maps, rotations=True)
    for turns in (1, 2, 3):
        assert torch.allclose(sym, sym.rot90(turns, (1, 2)))
    assert torch.allclose(flip_average(maps), flip_average(maps, rotations=False))
    assert not torch.allclose(flip_average(maps), flip_average(maps).rot90(1, (1, 2)))
    wide = flip_average(torch.rand(1, 4, 6), rotations=True)  # no quarter turn keeps a 4x6 grid: flips only
    assert torch.allclose(wide, wide.flip(1)) and torch.allclose(wide, wide.flip(2))
    code = torch.rand(3, 2, 5, 5)  # (classes, channels, *cells): only the trailing axes are spatial
    sym = flip_average(code, rotations=True, spatial_dims=2)
    assert torch.allclose(sym, sym.rot90(1, (2, 3))) and not torch.allclose(sym[0], sym[1])


def test_regional_rank_spreads_the_top_k_over_the_regions():
    scores = torch.zeros(1, 12, 12)
    scores[0, 4:8, 4:8] = 10.0 + torch.rand(4, 4)  # everything salient sits in the centre
    scores[0] += 0.01 * torch.rand(12, 12)
    assert topk_mask(scores, 16)[0, 0, 4:8, 4:8].sum() == 16  # the plain top-k takes the centre block
    ranks = regional_rank(scores, 3)
    assert ranks.min() > 0 and ranks.max() == 1.0
    assert (ranks.reshape(3, 4, 3, 4).permute(0, 2, 1, 3).reshape(9, 16).max(1).values == 1.0).all()
    mask = topk_mask(ranks, 18)[0, 0]  # 2 positions in each of the 9 regions of 4x4
    assert mask.reshape(3, 4, 3, 4).sum((1, 3)).flatten().tolist() == [2.0] * 9
    assert mask[4:8, 4:8][scores[0, 4:8, 4:8] >= scores[0, 4:8, 4:8].flatten().topk(2).values[-1]].all()
    assert torch.equal(topk_mask(regional_rank(scores, 1), 16), topk_mask(scores, 16))
    for bad in (0, 13):
        with pytest.raises(ValueError, match="regions"):
            regional_rank(scores, bad)


def test_rotation_symmetric_pattern_stays_symmetric_while_it_learns():
    gen = NoiseGenerator(2, 1, num_classes=2, pattern_size=(12, 12), pattern_cell=4, rotation_symmetric=True)
    optimizer = torch.optim.SGD(gen.parameters(), lr=1.0)
    loss = (gen(torch.rand(2, 1, 12, 12), torch.tensor([0, 1])) * torch.rand(2, 1, 12, 12)).sum()
    loss.backward()
    optimizer.step()
    pattern = gen.class_pattern()
    assert not torch.equal(pattern[0], pattern[1])
    for turns in (1, 2, 3):
        assert torch.allclose(pattern, pattern.rot90(turns, (2, 3)))
    assert torch.allclose(pattern, pattern.flip(2))
    plain = NoiseGenerator(2, 1, num_classes=2, pattern_size=(12, 12), pattern_cell=4).class_pattern()
    assert torch.equal(plain, plain.flip(3)) and not torch.equal(plain, plain.rot90(1, (2, 3)))


def test_rotation_symmetric_spread_training_and_checkpoint(tmp_path):
    data, ckpt = tmp_path / "d.npz", tmp_path / "salm.pt"
    make_medmnist(data, n=16, shape=(12, 12))
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1", "--warmup-epochs", "0",
                 "--k", "0.25", "--block", "2", "--rotation-symmetric", "--spread", "3", "--batch-size", "16",
                 "--quiet"]) == 0
    settings, generator, _, scores = load_protection(ckpt)
    assert settings.generator["rotation_symmetric"] is True
    assert torch.allclose(scores, scores.rot90(1, (1, 2)))
    # ranks within regions (mean about 0.5), not saliency shares of the whole image (mean 1 / 144)
    assert 0.3 < float(scores.mean()) < 0.7 and float(scores.max()) <= 1.0
    assert (topk_mask(scores, settings.k)[:, 0].reshape(-1, 3, 4, 3, 4).sum((2, 4)) > 0).sum() >= 5
    pattern = generator.class_pattern()
    assert torch.allclose(pattern, pattern.rot90(1, (2, 3)))


def test_pattern_only_generator_is_the_class_pattern(tmp_path):
    gen = NoiseGenerator(2, 1, num_classes=3, pattern_size=(12, 12), pattern_cell=4, image_term=False)
    assert gen.net is None and [name for name, _ in gen.named_parameters()] == ["class_code"]
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 2, 1, 2])
    assert torch.equal(gen(x, y), gen.class_pattern()[y])
    assert torch.equal(gen(torch.zeros_like(x), y), gen(x, y))  # the same change for every image of a class
    for bad in ({"num_classes": 0}, {"pattern_size": None}):
        with pytest.raises(ValueError, match="image term"):
            NoiseGenerator(2, 1, **{"num_classes": 3, "pattern_size": (12, 12), "image_term": False, **bad})
    data, ckpt = tmp_path / "d.npz", tmp_path / "salm.pt"
    make_medmnist(data, n=16, shape=(12, 12))
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1", "--warmup-epochs", "0",
                 "--pattern-only", "--batch-size", "16", "--quiet"]) == 0
    settings, generator, _, _ = load_protection(ckpt)
    assert settings.generator["image_term"] is False and generator.net is None
    assert not torch.equal(generator.class_code, NoiseGenerator(2, 1, 2, pattern_size=(12, 12), pattern_cell=4,
                                                                image_term=False).class_code)  # it was trained


def test_block_training_gives_block_masks_and_psnr_loader(tmp_path, tiny_classifier):
    # the surrogate's initial weights decide whether two cells tie (flip-symmetric cells can, and a tie is broken
    # by flat index, which may take half of each): seeded so the test does not depend on the tests run before it
    torch.manual_seed(0)
    x, y = _separable(32, shape=(12, 12))
    trainer, settings = train_salm(x, y, 2, epochs=1, k=32, epsilon=16 / 255, block=4, warmup_epochs=0,
                                   batch_size=16, surrogate=tiny_classifier(2, 1, 2))
    masks = trainer.class_masks[:, 0].float()  # k = 32 positions = two whole 4x4 cells per class
    assert (masks.sum((1, 2)) == 32).all()
    cells = masks.reshape(2, 3, 4, 3, 4).sum((2, 4))
    assert set(cells.unique().tolist()) <= {0.0, 16.0}
    assert settings.generator["pattern_cell"] == 4


def test_protection_transforms_psnr_lowers_epsilon_only(tmp_path):
    data = tmp_path / "d.npz"
    make_medmnist(data, n=16, shape=(16, 16))
    ckpt = tmp_path / "salm.pt"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1", "--warmup-epochs", "0",
                 "--k", "0.1", "--eps", "8/255", "--batch-size", "16", "--quiet"]) == 0
    strict = protection_transforms(ckpt, psnr=45.0).transforms[1]
    loose = protection_transforms(ckpt, psnr=10.0).transforms[1]
    assert strict.noiser.epsilon == pytest.approx(epsilon_for_psnr(45.0, 0.1, 256))
    assert loose.noiser.epsilon == pytest.approx(8 / 255)


def test_training_goes_through_the_attackers_flips_and_shifts_by_default(tmp_path):
    x = torch.rand(16, 1, 12, 12)
    y = torch.arange(16) % 2
    trainer, _ = train_salm(x, y, 2, epochs=1, warmup_epochs=0, batch_size=8, generator_kwargs={"channels": (4, 8, 16)})
    assert trainer.surrogate_view is not None and DEFAULTS["robust_to"] == "flip,crop:2"
    plain, _ = train_salm(x, y, 2, epochs=1, warmup_epochs=0, batch_size=8, generator_kwargs={"channels": (4, 8, 16)},
                          robust_to=None)
    assert plain.surrogate_view is None
    data = tmp_path / "d.npz"
    make_medmnist(data, n=16, shape=(12, 12))
    codes = {}
    for option in ([], ["--robust-to", "none"], ["--robust-to", "NONE"]):
        ckpt = tmp_path / f"salm{len(codes)}.pt"
        assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "1", "--warmup-epochs", "0",
                     "--batch-size", "8", "--seed", "3", "--quiet", *option]) == 0
        codes[len(codes)] = load_protection(ckpt)[1].class_code.detach()
    assert torch.equal(codes[1], codes[2]) and not torch.equal(codes[0], codes[1])  # "none" trains on the release
