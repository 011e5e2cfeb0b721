"""Launch arithmetic on the host, in plain Python.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions in recent Triton releases:
called from host code each unwraps its arguments first, several microseconds a call, and a small
call's launchers ask for up to four of them. These give the same integers for the sizes the
launchers pass (at least 1).
"""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` for ``n >= 1``, as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``a >= 0``, ``b > 0``, as ``triton.cdiv``."""
    return -(-a // b)
