"""The class-index range check: an index outside [0, C) other than ``ignore_index`` raises.

On CUDA the bad indices are counted on the device (fused with the mean normaliser where the
backend can) and read back without stalling the host where a gradient is wanted: the count
travels to pinned memory asynchronously and is read when backward starts if it has arrived,
else at the first later call that finds it arrived (or at ``wait_target_check()``).

The message names the function the user called (``who``): passed explicitly where the caller
knows it, else the name of the entry point this context is running (``reporting_as``), which a
deferred check keeps from the call that counted it.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

import torch
from torch import Tensor

_enabled = os.environ.get("FUSEDCE_CHECK_TARGETS", "1") != "0"
# The public function whose arguments are being checked, for the messages of checks that run
# below it (the row contract's fused count does not know its caller).
_CALLER: ContextVar[str] = ContextVar("fusedce_caller", default="cross_entropy")


class reporting_as:
    """``with reporting_as(who):`` the index errors raised inside name ``who`` (the public
    function the user called) unless told otherwise. Per thread and per asyncio task."""

    __slots__ = ("_token", "_who")

    def __init__(self, who: str) -> None:
        self._who = who

    def __enter__(self) -> None:
        self._token = _CALLER.set(self._who)

    def __exit__(self, *_exc: object) -> None:
        _CALLER.reset(self._token)


def current_caller() -> str:
    """The name index errors report now (see ``reporting_as``)."""
    return _CALLER.get()


def set_target_check(enabled: bool) -> None:
    """Turns the class-index range check on or off (default on; env ``FUSEDCE_CHECK_TARGETS=0``).

    The check raises ``IndexError`` for a class index outside [0, C) other than ``ignore_index``.
    On CUDA one tiny kernel counts the bad indices (fused with the mean normaliser). When a
    gradient is wanted, the count travels to pinned host memory asynchronously, and neither
    forward nor backward waits for it: the exception comes from ``loss.backward()`` when the
    count has arrived by then (the usual case), else from the first later fusedce call that
    finds it arrived, or from ``wait_target_check()``. Without a gradient (validation) it is read
    at once: one host sync. Switch the check off for CUDA-graph capture or the last
    microseconds. With it off (or until the error is raised) an out-of-range index never reads
    out of bounds: its row's loss and gradient are NaN.

    The vocabulary-parallel functions with ``vocab_start`` / ``vocab_size`` given also skip
    their metadata exchange while the check is off (the sizes, the ranks' agreement and the
    class indices are then trusted, and nothing is read back to the host); with it on, that
    one small all_gather checks them. Set it alike on every rank.
    """
    global _enabled
    _enabled = bool(enabled)


def target_check_enabled() -> bool:
    return _enabled


def unwrap_functorch(t: Tensor) -> Tensor:
    """The plain tensor under every ``torch.func`` wrapper (itself outside the transforms):
    under ``vmap`` it holds the values of the whole batch, so that a value check on it checks
    every sample (reading a batched tensor's values raises)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def bad_index_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(M,) bool: class indices outside [0, num_classes) that are not ``ignore_index``."""
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def count_bad_indices(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """() int32 device scalar: the number of bad class indices (no host sync)."""
    return bad_index_mask(target, num_classes, ignore_index).sum(dtype=torch.int32)


def raise_bad_index(
    target: Tensor,
    num_classes: int,
    ignore_index: int,
    earlier: bool = False,
    who: str | None = None,
) -> None:
    """Raises the IndexError of the first bad class index; ``who`` (default: the current
    caller, see ``reporting_as``) names the function the user called."""
    who = current_caller() if who is None else who
    value = int(target[bad_index_mask(target, num_classes, ignore_index)][0])
    where = (
        " in an earlier call (found when its count reached the host; that call's loss and "
        "gradient rows for it are NaN)"
        if earlier
        else ""
    )
    raise IndexError(
        f"{who}: target class index {value} is out of bounds for {num_classes} "
        f"classes (valid: 0..{num_classes - 1}, or ignore_index={ignore_index}){where}"
    )


def check_class_indices(
    target: Tensor, num_classes: int, ignore_index: int, who: str | None = None
) -> None:
    """Raises IndexError at once if a class index is bad (a host sync on CUDA)."""
    if not _enabled or target.dim() != 1 or target.numel() == 0:
        return
    if bool(count_bad_indices(target, num_classes, ignore_index)):
        raise_bad_index(target, num_classes, ignore_index, who=who)


class DeferredIndexCheck:
    """The bad-index count on its way to the host, read once it has arrived.

    Reading it in forward would stall the host until the GPU reaches this call and leave the
    GPU idle behind it; waiting for it in backward would do the same one step later. So it is
    read in backward if it has arrived, else it stays pending and the next fusedce call (or
    ``wait_target_check()``) reads it. Until then the loss and gradient rows of bad indices are
    NaN, so nothing is silently wrong in between. The message names the function of the call
    that counted (``who``, default the current caller), whenever it is raised.
    """

    def __init__(
        self,
        n_bad: Tensor,
        target: Tensor,
        num_classes: int,
        ignore_index: int,
        who: str | None = None,
    ) -> None:
        self.who = current_caller() if who is None else who
        self._host = torch.empty((), dtype=n_bad.dtype, pin_memory=True)
        self._host.copy_(n_bad, non_blocking=True)
        self._arrived = torch.cuda.Event()
        self._arrived.record()
        self._args = (target, num_classes, ignore_index)
        _pending.append(self)

    def resolve(self, wait: bool = False, earlier: bool = False) -> None:
        """Raises IndexError if the count has arrived and is not 0; without ``wait`` a count
        still on its way stays pending (no host sync)."""
        if self not in _pending:
            return  # read already
        if not self._arrived.query():
            if not wait:
                return
            self._arrived.synchronize()
        _pending.remove(self)
        if int(self._host):
            self.raise_bad(earlier)

    def raise_bad(self, earlier: bool) -> None:
        """Raises the error of the bad value counted (here: the first bad class index)."""
        raise_bad_index(*self._args, earlier=earlier, who=self.who)


# Counts not read yet, oldest first: few (each call reads those that have arrived).
_pending: list[DeferredIndexCheck] = []


def has_pending() -> bool:
    """Whether counts of earlier calls are still unread (``raise_pending`` reads them)."""
    return bool(_pending)


def raise_pending(wait: bool = False) -> None:
    """Reads the counts of earlier calls that have arrived (all of them, waiting, with
    ``wait``) and raises IndexError for the first with a bad index."""
    for check in list(_pending):
        check.resolve(wait=wait, earlier=True)


def wait_target_check() -> None:
    """Waits for the class-index counts of every earlier call (a host sync on CUDA) and raises
    ``IndexError`` if one saw an index outside [0, C) other than ``ignore_index``.

    Nothing to wait for on the CPU, or with the check off: there every call checks at once.
    """
    raise_pending(wait=True)


def settle(
    n_bad: Tensor | None,
    target: Tensor,
    num_classes: int,
    ignore_index: int,
    defer: bool,
    who: str | None = None,
) -> DeferredIndexCheck | None:
    """Acts on a device count of bad indices: raise now, or (``defer`` on CUDA) return the
    check to resolve in backward. ``n_bad`` None: nothing was counted. ``who``: the function
    the messages name (default the current caller, see ``reporting_as``)."""
    if n_bad is None:
        return None
    if defer and n_bad.is_cuda:
        return DeferredIndexCheck(n_bad, target, num_classes, ignore_index, who)
    if bool(n_bad):  # a host sync on CUDA (calls without a gradient); see set_target_check
        raise_bad_index(target, num_classes, ignore_index, who=who)
    return None
