"""Checkpoint files that are either whole or not there: `AtomicCheckpointIO`."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from .errors import CheckpointWriteError, RunDiverged


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` that hold a NaN or an inf."""
    bad = []
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor
            if not bool(torch.isfinite(local).all()):
                bad.append(name)
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to its target, flushes and fsyncs it,
    then renames it over the target (``os.replace``, atomic on POSIX filesystems).

    A failure at any point (a kill, a full disk) leaves the previous checkpoint of that name
    as it was. A full disk is a `CheckpointWriteError` that names the path and the bytes the
    checkpoint needs, and leaves no temporary file. A checkpoint whose weights are not finite
    is never written (`RunDiverged`). Paths with a URL scheme (``s3://``) go to Lightning's
    `TorchCheckpointIO` unchanged.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Writes ``checkpoint`` to ``path`` atomically.

        Raises:
            TypeError: ``storage_options`` given (as `TorchCheckpointIO`).
            CheckpointWriteError: The device of ``path`` has no room for the checkpoint.
            RunDiverged: The checkpoint's weights hold a NaN or an inf.
        """
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise RunDiverged(
                f"the weights are not finite ({', '.join(bad[:3])}) at step "
                f"{checkpoint.get('global_step')}: {path} is not written"
            )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if len(data) > free:
            raise _no_space(path, len(data), free)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            with os.fdopen(fd, "wb") as file:
                self.write(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(path, len(data), shutil.disk_usage(path.parent).free) from err
            raise
        _fsync_dir(path.parent)

    def write(self, data: memoryview, file: IO[bytes]) -> None:
        """Writes the serialised checkpoint into the open temporary file (a test seam)."""
        file.write(data)


def _no_space(path: Path, needed: int, free: int) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"no space left for checkpoint {path}: it needs {needed} bytes, the device has "
        f"{free} free (the previous checkpoint of that name is kept)"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def with_atomic_io(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` with an `AtomicCheckpointIO`, unless they hold a
    ``CheckpointIO`` already (a configured one is kept)."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, list | tuple):
        plugins = [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return list(plugins)
    return [*plugins, AtomicCheckpointIO()]
