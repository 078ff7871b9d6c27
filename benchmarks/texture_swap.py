"""Put a fixed class texture in place of a checkpoint's learned class pattern, keeping everything else.

The new checkpoint has the same class masks (class score maps), epsilon, k and intensity scaling; only the generator
changes, to ``NoiseGenerator(pattern_kind="texture")``. It isolates the form of the perturbation: the same pixels
carry a stripe or checkerboard texture per class instead of the learned cells. docs/results.md compares the two.

    python benchmarks/texture_swap.py pneumonia/salm.pt pneumonia/texture.pt
    monai-salm protect --checkpoint pneumonia/texture.pt --data pneumonia/data.npz --out pneumonia/texture.npz
    monai-salm evaluate --train pneumonia/texture.npz --test pneumonia/data.npz --epochs 20 --out pneumonia/texture/
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from texture_anatomy import texture as anatomy_texture

from monai_salm.engines import load_protection, save_protection
from monai_salm.networks import NoiseGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a class-mask checkpoint with a label-conditioned generator")
    parser.add_argument("out", help="the checkpoint to write")
    parser.add_argument("--textures", default=None,
                        help="2D: the class textures in class order, e.g. rows:2,diag:3 (kinds and periods of "
                             "benchmarks/texture_anatomy.py); default: NoiseGenerator's")
    args = parser.parse_args()
    settings, generator, surrogate, scores = load_protection(args.checkpoint)
    if settings.mask_mode != "class" or not settings.label_conditioned:
        raise SystemExit(f"{args.checkpoint}: needs class masks and a label-conditioned generator.")
    kwargs = {k: v for k, v in settings.generator.items() if k != "pattern_cell"}
    kwargs.update(pattern_size=list(settings.image_size), pattern_kind="texture")
    texture = NoiseGenerator(settings.spatial_dims, settings.in_channels, settings.num_classes, **kwargs)
    if args.textures:
        chosen = [(kind, int(period)) for kind, period in (item.split(":") for item in args.textures.split(","))]
        if settings.spatial_dims != 2 or len(chosen) != settings.num_classes:
            raise SystemExit(f"--textures: give one texture per class ({settings.num_classes}), 2D only.")
        codes = torch.stack([anatomy_texture(kind, period, settings.image_size) for kind, period in chosen])
        texture.class_code.copy_(10.0 * codes[:, None].expand_as(texture.class_code))
    settings = dataclasses.replace(settings, generator=kwargs)
    save_protection(args.out, settings, texture, surrogate, scores, extra={"texture_from": str(args.checkpoint)})
    print(f"wrote {args.out}: the class masks of {args.checkpoint} with a fixed texture per class")


if __name__ == "__main__":
    main()
