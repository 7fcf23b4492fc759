"""Checkpoints: atomic writes (a crash never leaves a half-written file) and a task-set check on load."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or belongs to another task set; the message is one line."""


def save_atomic(obj, path) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace onto `path`: readers
    see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path, num_outputs: dict | None = None, map_location="cpu") -> dict:
    """Read a checkpoint; when `num_outputs` ({task: n}) is given, check it matches the stored task set."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why, in one line
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "num_outputs" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a model.train checkpoint (no 'model'/'num_outputs')")
    if num_outputs is not None and dict(ckpt["num_outputs"]) != dict(num_outputs):
        raise CheckpointError(f"checkpoint {path} was trained for tasks {_describe(ckpt['num_outputs'])}, "
                              f"config asks for {_describe(num_outputs)}")
    return ckpt


def _describe(num_outputs):
    return "{" + ", ".join(f"{t}: {n}" for t, n in num_outputs.items()) + "}"
