from monai_salm.data.medmnist import SPLITS, from_tensor, is_rgb, load_npz, save_npz, split_arrays, to_tensor
