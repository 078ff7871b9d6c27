from monai_salm.data.medmnist import (
    SPLITS,
    changed_pixel_fraction,
    from_tensor,
    is_rgb,
    load_npz,
    save_npz,
    split_arrays,
    structural_similarity,
    to_tensor,
)
