"""Medical file I/O: list datasets, read images with their metadata, write protected copies and a manifest.

Example::

    from monai_salm.io import IntensityScaling, ProtectedCopyWriter, load_dataset, read_image

    records = load_dataset("dataset.json")                       # or a class folder, or a MedMNIST .npz
    scaling = IntensityScaling("window", lo=-1000, hi=1000)      # CT: eps in [0, 1] is eps * 2000 HU
    writer = ProtectedCopyWriter("protected/", records)
    for record in records:
        image, meta = read_image(record)                         # float32 (C, *spatial), original units
        clean = scaling.to_unit(image)
        protected = scaling.apply_delta(image, clean, protect(clean))
        writer.write(record, meta, protected, original=image)
    writer.write_manifest("protected/manifest.csv")
"""

from monai_salm.io.manifest import ManifestEntry, read_manifest, write_manifest
from monai_salm.io.readers import FORMATS, ImageMeta, ImageRecord, detect_format, load_dataset, probe_image, read_image
from monai_salm.io.scaling import IntensityScaling
from monai_salm.io.utils import atomic_path, sha256_file
from monai_salm.io.writers import DEFAULT_DESCRIPTION, ProtectedCopyWriter, write_image

__all__ = [
    "FORMATS",
    "DEFAULT_DESCRIPTION",
    "ImageRecord",
    "ImageMeta",
    "IntensityScaling",
    "ManifestEntry",
    "ProtectedCopyWriter",
    "atomic_path",
    "detect_format",
    "load_dataset",
    "probe_image",
    "read_image",
    "read_manifest",
    "sha256_file",
    "write_image",
    "write_manifest",
]
