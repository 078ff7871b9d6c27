"""Evaluator handler that writes the protected copy of each image and the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from monai_salm.engines.distributed import SharedError, barrier, gather, is_main, world_size
from monai_salm.io import DEFAULT_DESCRIPTION, ProtectedCopyWriter, write_manifest
from monai_salm.workflows.dataset import ProtectionDataset
from monai_salm.workflows.release_folder import RECORD_NAME, acquire_lock, claim_release, release_lock

__all__ = ["ProtectedCopySaver", "as_bool"]

_TRUE, _FALSE = ("true", "yes", "y", "on", "1"), ("false", "no", "n", "off", "0", "none", "")


def as_bool(value, name: str) -> bool:
    """A flag given as a bool, a number or a string from a config or the command line (``"no"`` is False).

    Raises:
        ValueError: naming the flag, for a value that is not clearly true or false.
    """
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")


class ProtectedCopySaver:
    """Evaluator handler writing each protected image as a copy of its file, and the manifest at the end.

    The change made in [0, 1] is carried back onto the original values with
    :meth:`IntensityScaling.apply_delta` and written by :class:`~monai_salm.io.ProtectedCopyWriter` (same format,
    metadata and relative layout; temporary name then rename). If the run fails, the files written so far (and
    the folders it created) are removed, so a failed run leaves no partial output.

    With ``resume``, a run interrupted earlier is completed: an image whose copy is already in ``output_dir``
    (every file present; files only ever appear there complete) is not written again, since protection is
    deterministic for the same checkpoint, data and seed. Its manifest entries are measured on the existing files
    (:meth:`~monai_salm.io.ProtectedCopyWriter.add_existing`), the missing copies are written, and the manifest
    covers every image. A failed resumed run removes only the files it created itself.

    While it writes, the folder holds a lock (``.monai-salm.lock``), so a second run into the same folder stops with
    an error; with ``uid_salt`` (the release identity), ``.monai-salm-release.json`` records it, and a resumed run
    of another checkpoint or seed is refused. An interrupted run (Ctrl-C) keeps the copies it finished, for
    ``resume``.

    Under ``torch.distributed`` each process runs this handler over its own share of the images (the evaluator's
    loader has a ``DistributedSampler`` without padding). Ending is collective: when every process succeeded, rank 0
    writes one manifest of all images in dataset order (the same file a single process writes); when any failed,
    every process removes what it wrote and raises the first failure's message (:class:`SharedError`).

    Args:
        dataset: the :class:`ProtectionDataset` the evaluator reads.
        output_dir: where the copy goes (must be outside the input, and empty unless ``overwrite`` or ``resume``).
        overwrite: allow a non-empty ``output_dir``.
        manifest_name: manifest file name inside ``output_dir`` (``.csv`` or ``.json``).
        description: DICOM DerivationDescription.
        resume: allow a non-empty ``output_dir`` and keep the copies already there.
        uid_salt: the release identity new DICOM UIDs are derived from (:class:`~monai_salm.io.ProtectedCopyWriter`;
            see :func:`~monai_salm.workflows.release_identity`); random when None.
        release_info: more about what made the release, kept in its record (checkpoint path and sha256, seed).
    """

    def __init__(self, dataset: ProtectionDataset, output_dir: str | os.PathLike, overwrite: bool = False,
                 manifest_name: str = "manifest.csv", description: str = DEFAULT_DESCRIPTION,
                 resume: bool = False, uid_salt: str | None = None, release_info: dict | None = None) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.resume = as_bool(resume, "resume")
        self.manifest_name = manifest_name
        self.description = description
        self.uid_salt = uid_salt
        self.release_info = dict(release_info or {})
        self.writer: ProtectedCopyWriter | None = None
        self.manifest_path: Path | None = None
        self._created: list[Path] = []
        self._entries: list[tuple[int, list]] = []  # (dataset index, manifest entries of its copy)
        self._finished = False
        self._locked = self._recorded = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def started(self, engine: Engine) -> None:
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        self.writer = ProtectedCopyWriter(self.output_dir, self.dataset.records, overwrite=self.overwrite,
                                          description=self.description, uid_salt=self.uid_salt, resume=self.resume)
        self._created = missing  # folders this run made (removed again if it fails)
        self._entries, self._finished = [], False
        barrier()  # every process has checked the output folder before the lock or any file appears in it
        problem = None
        if is_main():
            try:
                acquire_lock(self.output_dir)
                self._locked = True
                if self.uid_salt:
                    self._recorded = claim_release(self.output_dir, self.uid_salt, self.resume, self.release_info)
            except ValueError as e:
                problem = str(e)
        problem = next((p for p in gather(problem) if p is not None), None)  # all processes learn of it
        if problem is not None:
            raise SharedError(problem)
        if self.resume:
            done = sum(self.writer.is_written(r) for r in self.dataset.records)
            engine.logger.info(f"resuming in {self.output_dir}: {done} of {len(self.dataset.records)} image(s) "
                               "already written are kept.")

    def iteration_completed(self, engine: Engine) -> None:
        protected = engine.state.output["pred"].detach().cpu().numpy()
        indices = engine.state.batch["index"]
        for j, index in enumerate(torch.as_tensor(indices).reshape(-1).tolist()):
            record = self.dataset.records[index]
            original, clean_unit, meta = self.dataset.take(index)
            if self.resume and self.writer.is_written(record):
                entries = self.writer.add_existing(record, meta, original=original)
            else:
                array = self.dataset.scaling.apply_delta(original, clean_unit, protected[j])
                entries = self.writer.write(record, meta, array, original=original)
            self._entries.append((index, entries))

    def completed(self, engine: Engine) -> None:
        self._finish(None)
        written = len(self.writer.created) + len(self.writer.replaced)
        kept = f", kept {len(self.writer.entries) - written} already there," if self.resume else ""
        engine.logger.info(f"wrote {written} protected file(s){kept} and the manifest {self.manifest_path}.")

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):  # every process is interrupted: keep the finished copies for resume
            self._unlock()
            raise e
        if not self._finished:  # an error raised by _finish itself has been agreed on already
            self.cleanup()
            self._finish(e)
        raise e

    def _unlock(self) -> None:
        if self._locked:
            release_lock(self.output_dir)
            self._locked = False

    def _finish(self, error: Exception | None) -> None:
        """Collective end of the run: agree on failure, else write the manifest of every process's images."""
        self._finished = True
        parts = gather((None if error is None else str(error), self._entries))
        failure = next((message for message, _ in parts if message is not None), None)
        if failure is not None:
            if error is None:
                self.cleanup()
            if error is None or world_size() > 1:  # under torchrun every process stops with the same error
                raise SharedError(failure) from error
            return
        self.manifest_path = self.output_dir / self.manifest_name
        if is_main():
            ordered = sorted((item for _, entries in parts for item in entries), key=lambda item: item[0])
            write_manifest([entry for _, entries in ordered for entry in entries], self.manifest_path)
            self._unlock()
        barrier()

    def cleanup(self) -> None:
        """Remove the files written so far and the folders this run created, if empty.

        With ``resume``, files that existed before this run (written by an earlier one) are kept, even those this
        run replaced (a DICOM series completed here).
        """
        if self.writer is not None:
            folders = set()
            for out in self.writer.created + ([] if self.resume else self.writer.replaced):
                out.unlink(missing_ok=True)
                folders.update(p for p in out.parents if self.output_dir in (p, *p.parents))
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                if folder != self.output_dir and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            self.writer.entries.clear()
        if self._recorded:
            (self.output_dir / RECORD_NAME).unlink(missing_ok=True)
            self._recorded = False
        self._unlock()
        for folder in self._created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
