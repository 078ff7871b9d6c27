"""How strong the release's class signal is next to the anatomy's, in a victim's first steps.

In its first steps a freshly initialised network moves along the difference between the class means of its
training images, so what it learns first is decided by how large each part of that difference is: the anatomy's
(the clean class means) and the release's (the class means of the changes). This script prints, for every pair of
classes of a training split, the L2 norm of both differences, in [0, 1] intensity units, as released and after the
attacker's random shifts (each difference averaged over every shift of up to ``--shift`` pixels with zero fill, the
expectation a shifting victim sees), the cosine between them (with more than two classes, the median over the pairs), and the largest norm any release of the same PSNR could
add (all of its squared error spent on one class difference). A release whose difference is small next to the
anatomy's, or that shrinks most under the shifts, leaves a fresh victim learning the anatomy first.

    python benchmarks/shortcut_energy.py RUN/breast/data.npz RUN/breast/salm.npz [--split train] [--shift 2]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F

from monai_salm.data import load_npz, split_arrays, to_tensor


def class_means(images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Mean image of each class present."""
    return {int(c): images[labels == c].mean(0) for c in labels.unique()}


def shifted(diff: torch.Tensor, shift: int) -> torch.Tensor:
    """The expectation of ``diff`` (``C, *spatial``) over uniform integer shifts of up to ``shift`` per axis, zero fill."""
    if shift <= 0:
        return diff
    size = 2 * shift + 1
    pool = F.avg_pool2d if diff.ndim == 3 else F.avg_pool3d
    return pool(diff[None], size, 1, shift, count_include_pad=True)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clean", help="the clean MedMNIST-style .npz")
    parser.add_argument("protected", help="its release (the same images, protected)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--shift", type=int, default=2, help="the attacker's largest shift in pixels (default 2)")
    parser.add_argument("--pairs", action="store_true", help="print every pair of classes, not only the median, "
                                                             "when there are more than three pairs")
    args = parser.parse_args()
    clean_x, labels = split_arrays(load_npz(args.clean), args.split)
    prot_x, prot_labels = split_arrays(load_npz(args.protected), args.split)
    clean, prot = to_tensor(clean_x).double(), to_tensor(prot_x).double()
    labels = torch.as_tensor(labels).reshape(-1).long()
    if clean.shape != prot.shape or not torch.equal(labels, torch.as_tensor(prot_labels).reshape(-1).long()):
        raise SystemExit(f"{args.protected}: the {args.split} split does not hold the same images as {args.clean}.")
    delta = prot - clean
    mse = float(delta.pow(2).mean())
    psnr = 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")
    bound = 2 * math.sqrt(mse * clean[0].numel())  # one class difference carrying the whole squared error
    anatomy, change = class_means(clean, labels), class_means(delta, labels)
    print(f"{args.protected} ({args.split}, {len(labels)} images): PSNR {psnr:.2f} dB; largest class difference a "
          f"release of this PSNR can add: {bound:.3f}")
    print("| classes | anatomy | release | release / anatomy | anatomy, shifted | release, shifted | "
          "release / anatomy, shifted | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for a, b in itertools.combinations(sorted(anatomy), 2):
        d_anat, d_rel = anatomy[a] - anatomy[b], change[a] - change[b]
        s_anat, s_rel = shifted(d_anat, args.shift), shifted(d_rel, args.shift)
        n = [float(t.norm()) for t in (d_anat, d_rel, s_anat, s_rel)]
        cos = float(F.cosine_similarity(d_anat.flatten(), d_rel.flatten(), dim=0))
        rows.append((f"{a}-{b}", n[0], n[1], n[1] / max(n[0], 1e-12), n[2], n[3], n[3] / max(n[2], 1e-12), cos))
    if len(rows) > 1:  # several classes: the median of each column over the pairs
        rows.append(("median", *[float(torch.tensor([r[i] for r in rows]).median()) for i in range(1, 8)]))
    for name, *v in rows if len(rows) <= 4 or args.pairs else rows[-1:]:
        print(f"| {name} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.2f} | {v[3]:.3f} | {v[4]:.3f} | {v[5]:.2f} | {v[6]:+.3f} |")


if __name__ == "__main__":
    main()
