from monai_salm.transforms.array import ApplyUnlearnableNoise, SaliencyMask
from monai_salm.transforms.dictionary import (
    ApplyUnlearnableNoiseD,
    ApplyUnlearnableNoised,
    ApplyUnlearnableNoiseDict,
    SaliencyMaskD,
    SaliencyMaskd,
    SaliencyMaskDict,
)
from monai_salm.transforms.functional import (
    call_generator,
    epsilon_for_psnr,
    perturb,
    resize_images,
    resolve_k,
    saliency_scores,
    to_grid,
    topk_mask,
)
