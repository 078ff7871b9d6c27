"""pydicom 2's ``pydicom._storage_sopclass_uids`` for pydicom 3, so that pydicom-seg 0.4.1 imports.

MONAI Label 0.8.5 imports pydicom-seg when its server starts, and pydicom-seg imports
``from pydicom._storage_sopclass_uids import SegmentationStorage``, a module pydicom 3 removed (its UIDs now live in
``pydicom.uid``). monai-salm needs pydicom 3, so the MONAI Label environment keeps pydicom 3 and gets this module,
copied into the installed ``pydicom`` package folder::

    cp apps/monailabel_salm/compat/_storage_sopclass_uids.py \
        "$(python -c 'import os, pydicom; print(os.path.dirname(pydicom.__file__))')/"

Every name is read from ``pydicom.uid``; nothing else changes.
"""

from pydicom import uid as _uid
from pydicom.uid import SegmentationStorage  # noqa: F401 - the name pydicom-seg imports


def __getattr__(name: str):
    """Any other storage SOP class UID of pydicom 2's module, e.g. ``CTImageStorage``."""
    try:
        return getattr(_uid, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
