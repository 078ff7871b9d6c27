"""monai-salm: Sparsity-Aware Local Masking (SALM) unlearnable examples for MONAI."""

__version__ = "0.1.0"
