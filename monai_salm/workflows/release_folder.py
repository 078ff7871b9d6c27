"""What a release folder says about the run writing it: a lock while it is written, and the identity of the release
(checkpoint and seed) that made it, so that nothing else resumes into it or writes into it at the same time."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

__all__ = ["LOCK_NAME", "RECORD_NAME", "acquire_lock", "release_lock", "claim_release"]

LOCK_NAME = ".monai-salm.lock"
RECORD_NAME = ".monai-salm-release.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(folder: Path) -> Path:
    """Create ``folder/.monai-salm.lock`` for this process, or fail if a live run holds it.

    A lock left by a run that was killed (its process is gone on this host) is taken over.

    Raises:
        ValueError: naming the folder, when another run on this or another host holds the lock.
    """
    lock = folder / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # stale: its run was killed
                continue
            raise ValueError(f"{folder}: another monai-salm run is writing into this folder ({holder or 'unknown'}; "
                             f"delete {lock} if that run is gone).") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise ValueError(f"{folder}: could not take the lock {lock}.")


def release_lock(folder: Path) -> None:
    """Remove this process's lock from ``folder`` (if it is there)."""
    (folder / LOCK_NAME).unlink(missing_ok=True)


def claim_release(folder: Path, identity: str, resume: bool, info: dict | None = None) -> bool:
    """Record ``identity`` as the release written into ``folder``, refusing to resume another release.

    Args:
        folder: the output folder (locked by this run).
        identity: the release identity (:func:`~monai_salm.workflows.release_identity`).
        resume: the run completes an earlier one, which must have been the same release.
        info: more to record beside the identity (checkpoint path and sha256, seed).

    Returns:
        whether this call wrote the record (so a failed run removes it again).

    Raises:
        ValueError: naming the folder, when resuming into a release made by another checkpoint or seed.
    """
    record = folder / RECORD_NAME
    try:
        earlier = json.loads(record.read_text()).get("release_identity") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        earlier = "unreadable"
    if resume and earlier is not None and earlier != identity:
        raise ValueError(f"{folder}: holds a release made with another checkpoint or seed; resume it with the same "
                         "ones, or write this release into another folder.")
    if earlier == identity:
        return False
    record.write_text(json.dumps({**(info or {}), "release_identity": identity}, indent=1) + "\n")
    return True
