"""MONAI Label app serving SALM protection (monai-salm) as the ``salm_protect`` inference task.

Start it (in its own environment, set up as ``docs/monailabel.md`` says)::

    monailabel start_server --app apps/monailabel_salm --studies /path/to/studies --conf checkpoint /path/to/salm.pt

then ``curl -X POST "http://127.0.0.1:8000/infer/salm_protect?image=<id>&output=image" -o protected.nii.gz``.

Conf keys (``--conf KEY VALUE``): ``checkpoint`` (default ``<app>/model/salm.pt``), ``device`` (default CUDA when
available, else CPU), ``seed`` (random-mask ablation only, default 0).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import HTTPException
from lib.infers import SALMProtect
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask

import monai_salm

__all__ = ["SALMApp"]


class SALMApp(MONAILabelApp):
    """MONAI Label app with one inference task, ``salm_protect``.

    Compared with a bare :class:`MONAILabelApp`, :meth:`infer` answers an unknown image id with a 404 naming the id,
    turns MONAI Label's own errors (e.g. an unknown task name) into a 400 with their message instead of an
    unexplained 500, and never saves a protected copy into the datastore as a label (``save_label`` is ignored).

    Args:
        app_dir: this folder.
        studies: the studies folder (or DICOMweb URL).
        conf: ``--conf`` key/value pairs (``checkpoint``, ``device``, ``seed``).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.checkpoint = os.path.realpath(conf.get("checkpoint") or os.path.join(app_dir, "model", "salm.pt"))
        self.device = conf.get("device") or None
        self.seed = int(conf.get("seed", 0))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-salm",
            description="SALM unlearnable-noise protection of medical images (monai-salm)",
            version=monai_salm.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """``{"salm_protect": SALMProtect(checkpoint)}``."""
        return {"salm_protect": SALMProtect(self.checkpoint, device=self.device, seed=self.seed)}

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's ``infer``, with clear HTTP errors for an unknown image id and MONAI Label's own errors.

        Args:
            request: MONAI Label's request (``model``, ``image``, ``params`` merged in).
            datastore: the datastore to resolve the image id in (the app's by default).

        Returns:
            MONAI Label's result (``file``, ``params``, ...).

        Raises:
            HTTPException: 404 for an image id that is not in the datastore, 400 for a ``MONAILabelException``.
        """
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            store = datastore if datastore else self.datastore()
            if not store.get_image_uri(image):
                raise HTTPException(
                    status_code=404,
                    detail=f"image id {image!r} is not in the datastore (GET /datastore/?output=all lists the ids).",
                )
        if request.get("model") == "salm_protect":
            request = {**request, "save_label": False}  # a protected copy is not a label of the image
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            raise HTTPException(status_code=400, detail=f"{e.error.value}: {e.msg}") from e
