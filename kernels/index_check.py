"""The class-index range check: an index outside [0, C) other than ``ignore_index`` raises.

On CUDA the bad indices are counted on the device (fused with the mean normaliser where the
backend can) and read back without stalling the host where a gradient is wanted: the count
travels to pinned memory asynchronously and is read when backward starts.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_enabled = os.environ.get("FUSEDCE_CHECK_TARGETS", "1") != "0"


def set_target_check(enabled: bool) -> None:
    """Turns the class-index range check on or off (default on; env ``FUSEDCE_CHECK_TARGETS=0``).

    The check raises ``IndexError`` for a class index outside [0, C) other than ``ignore_index``.
    On CUDA one tiny kernel counts the bad indices (fused with the mean normaliser). When a
    gradient is wanted, the count travels to pinned host memory asynchronously and is read when
    backward starts: the exception comes from ``loss.backward()`` and forward never stalls the
    host. Without a gradient (validation) it is read at once: one host sync. Switch the check
    off for CUDA-graph capture or the last microseconds. With it off (or before backward) an
    out-of-range index still never reads out of bounds: its row's loss and gradient are NaN.
    """
    global _enabled
    _enabled = bool(enabled)


def target_check_enabled() -> bool:
    return _enabled


def bad_index_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(M,) bool: class indices outside [0, num_classes) that are not ``ignore_index``."""
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def count_bad_indices(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """() int32 device scalar: the number of bad class indices (no host sync)."""
    return bad_index_mask(target, num_classes, ignore_index).sum(dtype=torch.int32)


def raise_bad_index(target: Tensor, num_classes: int, ignore_index: int) -> None:
    value = int(target[bad_index_mask(target, num_classes, ignore_index)][0])
    raise IndexError(
        f"cross_entropy: target class index {value} is out of bounds for {num_classes} "
        f"classes (valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
    )


def check_class_indices(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError at once if a class index is bad (a host sync on CUDA)."""
    if not _enabled or target.dim() != 1 or target.numel() == 0:
        return
    if bool(count_bad_indices(target, num_classes, ignore_index)):
        raise_bad_index(target, num_classes, ignore_index)


class DeferredIndexCheck:
    """The bad-index count on its way to the host, read when the backward pass starts.

    Reading it in forward would stall the host until the GPU reaches this call and leave the
    GPU idle behind it; by backward the count has normally long arrived. Until then the loss
    and gradient rows of bad indices are NaN, so nothing is silently wrong in between.
    """

    def __init__(self, n_bad: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> None:
        self._host = torch.empty((), dtype=n_bad.dtype, pin_memory=True)
        self._host.copy_(n_bad, non_blocking=True)
        self._arrived = torch.cuda.Event()
        self._arrived.record()
        self._args = (target, num_classes, ignore_index)

    def resolve(self) -> None:
        """Raises IndexError if the forward pass saw an out-of-range class index."""
        if not self._arrived.query():  # normally arrived long ago: no wait at all
            self._arrived.synchronize()
        if int(self._host):
            raise_bad_index(*self._args)


def settle(
    n_bad: Tensor | None, target: Tensor, num_classes: int, ignore_index: int, defer: bool
) -> DeferredIndexCheck | None:
    """Acts on a device count of bad indices: raise now, or (``defer`` on CUDA) return the
    check to resolve in backward. ``n_bad`` None: nothing was counted."""
    if n_bad is None:
        return None
    if defer and n_bad.is_cuda:
        return DeferredIndexCheck(n_bad, target, num_classes, ignore_index)
    if bool(n_bad):  # a host sync on CUDA (calls without a gradient); see set_target_check
        raise_bad_index(target, num_classes, ignore_index)
    return None
