"""How much of each class texture the clean images already carry, class by class.

A victim trained on a texture release learns texture detectors. If the clean images of one class excite the
detector of another class's texture more than their own, the victim reads clean images wrongly and consistently,
which an attacker holding labelled clean images turns back into a right rule (docs/evaluation.md, relabelling). This
script measures that for a checkpoint's class masks: for each texture (stripes along an axis, diagonal stripes or a
checkerboard, of a given period), the mean absolute response of its one-period filter to the high-passed clean
image inside the masks. For two textures a and b it prints the AUC with which "response to b minus response to a"
separates the classes (0.5: the clean images carry neither more than the other; far from 0.5: they do, and
the pair is entangled with the anatomy).

    python benchmarks/texture_anatomy.py RUN/pneumonia/salm.pt RUN/pneumonia/data.npz --split test
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from monai_salm.data import load_npz, split_arrays, to_tensor
from monai_salm.engines import load_protection
from monai_salm.networks.generator import _square_wave
from monai_salm.transforms.functional import topk_mask

KINDS = {"rows": "stripes along the first axis", "cols": "stripes along the second axis", "diag": "diagonal stripes",
         "check": "checkerboard"}


def texture(kind: str, period: int, size: tuple[int, int]) -> torch.Tensor:
    """A +-1 square-wave texture (2D)."""
    i = torch.arange(size[0], dtype=torch.float64)[:, None].expand(*size)
    j = torch.arange(size[1], dtype=torch.float64)[None, :].expand(*size)
    wave = lambda t: _square_wave(t, period)  # noqa: E731
    return {"rows": wave(i), "cols": wave(j), "diag": wave(i + j), "check": wave(i) * wave(j)}[kind]


def responses(images: torch.Tensor, region: torch.Tensor, kind: str, period: int) -> torch.Tensor:
    """Mean absolute one-period filter response of each high-passed image inside ``region``."""
    kernel = texture(kind, period, (2 * period, 2 * period))[None, None].repeat(1, images.shape[1], 1, 1)
    high = images - F.avg_pool2d(images, 5, 1, 2, count_include_pad=False)
    out = F.conv2d(high, kernel, padding=period)[..., : images.shape[2], : images.shape[3]].abs()
    return (out * region).sum((1, 2, 3)) / region.sum() / kernel.abs().sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a 2D class-mask checkpoint: its masks give the region looked at")
    parser.add_argument("data", help="the clean MedMNIST-style .npz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--periods", default="2,3,4,6")
    parser.add_argument("--pairs", type=int, default=6, help="how many of the most and least balanced pairs to print")
    args = parser.parse_args()
    settings, _, _, scores = load_protection(args.checkpoint)
    if settings.spatial_dims != 2 or scores is None:
        raise SystemExit(f"{args.checkpoint}: needs a 2D class-mask checkpoint.")
    images, labels = split_arrays(load_npz(args.data), args.split)
    x, y = to_tensor(images), torch.from_numpy(labels).long().reshape(-1)
    if tuple(x.shape[2:]) != tuple(settings.image_size):
        raise SystemExit(f"{args.data}: images {tuple(x.shape[2:])} differ from the checkpoint's grid.")
    region = (topk_mask(scores, settings.k).sum(0, keepdim=True) > 0).float()  # where any class mask lies
    candidates = [(kind, int(p)) for p in args.periods.split(",") for kind in KINDS]
    energy = {c: responses(x, region, *c) for c in candidates}
    if int(y.max()) != 1:
        raise SystemExit("this diagnostic compares two classes; the data has more.")
    rows = []
    for a, b in itertools.combinations(candidates, 2):
        ta, tb = texture(*a, (24, 24)), texture(*b, (24, 24))
        if torch.equal(ta, tb) or torch.equal(ta, -tb):
            continue  # the same texture up to sign (a checkerboard of period 2 is also diagonal stripes)
        rows.append((float(compute_roc_auc(energy[b] - energy[a], y)), a, b))
    rows.sort(key=lambda r: abs(r[0] - 0.5))
    name = lambda c: f"{c[0]}/{c[1]}"  # noqa: E731
    print(f"{args.data} ({args.split}, {len(y)} images), region: the class masks of {args.checkpoint}")
    print("AUC of 'response to b - response to a' for class 1 (0.5: balanced)")
    default = [r for r in rows if {r[1], r[2]} == {("rows", 4), ("cols", 4)}]
    for auc, a, b in default:
        print(f"  the default pair, class 0 {name(a)} / class 1 {name(b)}: {auc:.3f}")
    print("  most balanced: " + ", ".join(f"{name(a)} vs {name(b)} {auc:.3f}" for auc, a, b in rows[: args.pairs]))
    least = rows[len(rows) - args.pairs:]
    print("  least balanced: " + ", ".join(f"{name(a)} vs {name(b)} {auc:.3f}" for auc, a, b in least))


if __name__ == "__main__":
    main()
