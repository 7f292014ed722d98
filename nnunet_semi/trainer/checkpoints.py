"""Crash-safe checkpoint files: one complete write to a temporary file beside the target, then an atomic rename, and
reading that tells a damaged file from a missing one.

A process killed at any instant leaves either the previous complete file or the new complete one under the final
name; at worst a stray ``<name>.tmp-<pid>`` file, which the next write removes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import torch

CHECKPOINT_FILES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (cut short, empty, not a torch checkpoint)."""


def atomic_torch_save(obj, path: str, before_replace: Callable[[], None] | None = None) -> None:
    """``torch.save(obj, path)`` through ``<path>.tmp-<pid>`` in the same folder, flushed to disk, then
    ``os.replace``d onto ``path`` (atomic on POSIX and Windows within one file system).

    Args:
        obj: what to save.
        path: final file name.
        before_replace: called after the temporary file is complete and before the rename (tests use it to widen
            the window in which a kill can land).
    """
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(os.path.abspath(path)) + ".tmp-*"):  # left by a killed writer
        try:
            os.remove(stale)
        except OSError:
            pass
    temporary = os.path.join(folder, f"{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    try:  # make the rename itself durable
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict in ``path``; raises DamagedCheckpointError (with the cause) if it cannot be read, and
    FileNotFoundError if there is no such file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # EOFError, RuntimeError (zip archive), UnpicklingError, ...
        raise DamagedCheckpointError(f"{path} ({os.path.getsize(path)} bytes) cannot be read: "
                                     f"{type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise DamagedCheckpointError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint
