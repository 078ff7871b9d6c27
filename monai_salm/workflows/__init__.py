"""Dataset-to-protected-copy workflows shared by the ``monai-salm`` command line and the bundle.

Both ``monai-salm train|protect`` and ``bundles/salm_protect`` (``python -m monai.bundle run``) go through the
functions and classes here, so a dataset is read, scaled, checked, protected and written the same way:

- :func:`load_training_arrays` / :func:`load_train_val`: a MONAI datalist JSON, a folder with one subfolder per
  class, or a MedMNIST ``.npz`` -> ``(N, C, *spatial)`` tensors in [0, 1] with an explicit
  :class:`~monai_salm.io.IntensityScaling` (stored in the checkpoint, it defines what epsilon means in original
  units);
- :class:`BundleNoiseGenerator`, :func:`make_settings`, :class:`ProtectedValidationInferer`,
  :class:`SaveProtection`: the pieces of the bundle's training config around
  :class:`~monai_salm.engines.SALMTrainer`;
- :func:`protect_dataset`: protect any dataset with a checkpoint, every image at its own size: a ``.npz`` into a
  ``.npz`` (:func:`protect_npz`), a datalist or class folder into a folder of copies in the same formats and layout,
  with a manifest (:func:`load_checkpoint`, :class:`ProtectionDataset`, :class:`ProtectInferer`,
  :class:`ProtectedCopySaver`, :func:`protect_evaluator`, :func:`protect_files`; ``resume=True`` completes an
  interrupted run).

Modules, one job each (every name is also importable from ``monai_salm.workflows``):

- :mod:`~monai_salm.workflows.intensity`: :func:`parse_intensity`, :func:`scaling_from_settings`;
- :mod:`~monai_salm.workflows.arrays`: :class:`TrainingArrays`, :func:`load_training_arrays`;
- :mod:`~monai_salm.workflows.split`: :func:`has_validation`, :func:`split_validation`, :class:`SALMData`,
  :func:`load_train_val`;
- :mod:`~monai_salm.workflows.bundle_networks`: :class:`NetworkShape`, :func:`network_shape`,
  :class:`BundleNoiseGenerator`;
- :mod:`~monai_salm.workflows.training`: :func:`make_settings`, :class:`ProtectedValidationInferer`,
  :class:`SaveProtection`;
- :mod:`~monai_salm.workflows.dataset`: :class:`ProtectionDataset`;
- :mod:`~monai_salm.workflows.saver`: :class:`ProtectedCopySaver`;
- :mod:`~monai_salm.workflows.protect`: :class:`Protection`, :func:`load_checkpoint`, :class:`ProtectInferer`,
  :func:`protect_evaluator`, :func:`protect_files` and :func:`protect_dataset`, the one release entry point for
  every form of dataset;
- :mod:`~monai_salm.workflows.npz_release`: :func:`protect_npz` (a MedMNIST-style ``.npz`` release);
- :mod:`~monai_salm.workflows.summary`: :func:`log_checkpoint`, :func:`log_manifest`;
- :mod:`~monai_salm.workflows.evaluate`: :func:`run_evaluation` (``monai-salm evaluate``, ``configs/evaluate.json``);
- :mod:`~monai_salm.workflows.verify`: :func:`verify_release` (``monai-salm verify``).

The SALM math itself lives in :mod:`monai_salm.api`, :mod:`monai_salm.engines` and
:mod:`monai_salm.transforms.functional`.
"""

from monai_salm.workflows.arrays import TrainingArrays, load_training_arrays
from monai_salm.workflows.dataset import ProtectionDataset
from monai_salm.workflows.evaluate import run_evaluation
from monai_salm.workflows.intensity import parse_intensity, scaling_from_settings
from monai_salm.workflows.bundle_networks import BundleNoiseGenerator, NetworkShape, network_shape
from monai_salm.workflows.npz_release import protect_npz
from monai_salm.workflows.protect import (
    Protection,
    ProtectInferer,
    load_checkpoint,
    protect_dataset,
    protect_evaluator,
    protect_files,
    release_identity,
    release_record,
)
from monai_salm.workflows.saver import ProtectedCopySaver
from monai_salm.workflows.split import SALMData, has_validation, load_train_val, split_validation
from monai_salm.workflows.summary import log_checkpoint, log_manifest
from monai_salm.workflows.training import (
    ProtectedValidationInferer,
    SaveProtection,
    check_checkpoint_output,
    make_settings,
    resolve_epsilon,
)
from monai_salm.workflows.verify import Check, verify_release

__all__ = [
    "TrainingArrays",
    "SALMData",
    "Protection",
    "parse_intensity",
    "scaling_from_settings",
    "has_validation",
    "load_training_arrays",
    "split_validation",
    "load_train_val",
    "NetworkShape",
    "network_shape",
    "BundleNoiseGenerator",
    "make_settings",
    "resolve_epsilon",
    "ProtectedValidationInferer",
    "SaveProtection",
    "check_checkpoint_output",
    "load_checkpoint",
    "ProtectionDataset",
    "ProtectInferer",
    "ProtectedCopySaver",
    "protect_evaluator",
    "protect_files",
    "protect_dataset",
    "protect_npz",
    "release_identity",
    "release_record",
    "log_checkpoint",
    "log_manifest",
    "run_evaluation",
    "Check",
    "verify_release",
]
