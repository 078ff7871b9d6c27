"""How a checkpoint's class patterns relate to each other, to themselves after an in-plane quarter turn, and to
the pattern they were started from.

A victim that rotates its inputs by 90 degrees sees each class's pattern turned. When the turned pattern of one
class resembles another class's, rotation augmentation feeds the victim contradicting shortcuts. Prints, over the
union of the class masks, the correlation of every pair of class patterns and of each turned pattern with the
original patterns (2D checkpoints with a square working grid and a spatial class pattern), then how far training
moved the class pattern inside the masks from its seeded random start.

    python benchmarks/pattern_symmetry.py RUN/breast/salm.pt
"""

from __future__ import annotations

import argparse

import torch

from monai_salm.engines import load_protection
from monai_salm.networks import NoiseGenerator
from monai_salm.transforms.functional import topk_mask


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened changes."""
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    settings, generator, _, scores = load_protection(args.checkpoint)
    if settings.spatial_dims != 2 or scores is None or generator.pattern_size is None:
        raise SystemExit(f"{args.checkpoint}: needs a 2D class-mask checkpoint with a spatial class pattern.")
    with torch.no_grad():
        change = torch.tanh(generator.class_pattern())  # (classes, C, H, W), the change in units of epsilon
    inside = topk_mask(scores, settings.k).bool().any(0)[0]  # union of the class masks, (H, W)
    turned = change.rot90(1, (2, 3))
    print("| pattern | " + " | ".join(f"class {c}" for c in range(settings.num_classes)) + " |")
    print("|---|" + "---|" * settings.num_classes)
    for name, source in (("class {}", change), ("class {} turned 90 degrees", turned)):
        for c in range(settings.num_classes):
            cells = [correlation(source[c][:, inside], change[d][:, inside]) for d in range(settings.num_classes)]
            print(f"| {name.format(c)} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    start = NoiseGenerator(settings.spatial_dims, settings.in_channels, settings.num_classes, **settings.generator)
    with torch.no_grad():
        code, initial = generator.class_pattern()[..., inside], start.class_pattern()[..., inside]
    print(f"class pattern inside the masks (before tanh): {float((code.sign() == initial.sign()).float().mean()):.3f} "
          f"of its signs as started, mean |change| {float((code - initial).abs().mean()):.4f} against a mean |value| "
          f"of {float(initial.abs().mean()):.2f}")


if __name__ == "__main__":
    main()
