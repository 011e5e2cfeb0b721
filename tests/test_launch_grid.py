"""The launchers' host arithmetic (``backends.grid``) gives Triton's own integers: every size up
to 5000 and both sides of each power of two up to 2**40 (row counts and vocabularies far past
any real call)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from fusedce.backends.grid import cdiv, next_pow2  # noqa: E402

SIZES = sorted({*range(1, 5001), *(2**k + d for k in range(1, 41) for d in (-1, 0, 1))})


def test_next_pow2_is_tritons() -> None:
    assert [next_pow2(n) for n in SIZES] == [triton.next_power_of_2(n) for n in SIZES]


def test_cdiv_is_tritons() -> None:
    pairs = [(a, b) for a in (*range(0, 300), 2**31 - 1, 2**31, 2**40 + 3) for b in range(1, 70)]
    assert [cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]
