"""The cross-entropy benchmark's one-pass extras providers: each is checked against the float64
reference of its own loss, and the summary reports its time over the plain call's.

In process and on tiny cells (no subprocess): seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_cross_entropy import parse_args
from benchmarks.cross_entropy import accuracy
from benchmarks.cross_entropy.cell import Timing, run_cell
from benchmarks.cross_entropy.providers import (
    ALL_PROVIDERS,
    DEFAULT_PROVIDERS,
    EXTRAS,
    PLAIN,
    make_loss_fn,
    token_weights,
)
from benchmarks.cross_entropy.report import EXTRAS_COLUMNS, markdown, summary_table
from benchmarks.cross_entropy.sweep import Cell

FAST = Timing(cpu_budget_s=0.0, cpu_min_reps=1)
PROVIDERS = ["fusedce", *EXTRAS]


def _inputs(n: int = 40, v: int = 37) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    t = torch.randint(0, v, (n,), generator=gen)
    return x, t, token_weights(t)


def test_extras_providers_are_listed_and_default() -> None:
    assert set(EXTRAS) == {"fusedce_extras", "fusedce_token_weight", "fusedce_all"}
    assert set(EXTRAS) <= set(ALL_PROVIDERS) and set(EXTRAS) <= set(DEFAULT_PROVIDERS)
    assert EXTRAS["fusedce_extras"].text() == "softcap=30.0, z_loss=0.0001, return_stats=True"
    assert set(EXTRAS_COLUMNS.values()) == set(EXTRAS)
    # --quick drops only torch.compile from the defaults: the extras stay.
    assert set(EXTRAS) <= set(parse_args(["--quick"]).providers.split(","))


@pytest.mark.parametrize("name", list(EXTRAS))
def test_reference_matches_torch_composition(name: str) -> None:
    """The float64 reference equals the extras written with torch ops (loss and gradient)."""
    e = EXTRAS[name]
    x, t, w = _inputs()
    xr = x.clone().requires_grad_()
    z = xr * e.logit_scale
    if e.softcap is not None:
        z = e.softcap * torch.tanh(z / e.softcap)
    rows = F.cross_entropy(z, t, reduction="none") + e.z_loss * torch.logsumexp(z, 1).square()
    ww = w.double() if e.token_weight else torch.ones_like(rows)
    loss = (ww * rows).sum() / ww.sum()
    (g,) = torch.autograd.grad(loss, xr)
    assert accuracy.reference_loss(x, t, e, w) == pytest.approx(loss.item(), rel=1e-12)
    sample = accuracy.sample_rows(x.shape[0])
    ref = accuracy.reference_grad_rows(x, t, sample, e, w)
    torch.testing.assert_close(ref, g[sample], rtol=1e-10, atol=1e-14)
    # The provider computes that loss (float32 logits).
    got = make_loss_fn(name, w)(x.float(), t)
    assert got.item() == pytest.approx(loss.item(), rel=1e-5)


def test_plain_reference_gradient_is_softmax_minus_onehot() -> None:
    x, t, _ = _inputs()
    rows = accuracy.sample_rows(x.shape[0])
    expected = torch.softmax(x[rows], 1)
    expected[torch.arange(len(rows)), t[rows]] -= 1.0
    ref = accuracy.reference_grad_rows(x, t, rows, PLAIN)
    torch.testing.assert_close(ref, expected / x.shape[0], rtol=1e-12, atol=1e-15)


def test_token_weight_provider_needs_weights() -> None:
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="token weights"):
        make_loss_fn("fusedce_token_weight")(x.float(), t)


@pytest.mark.parametrize(("mode", "dtype"), [("fwd_bwd", "fp32"), ("fwd", "bf16")])
def test_cell_measures_extras_against_their_own_reference(mode: str, dtype: str) -> None:
    cell = Cell(mode, dtype, 64, 100, "custom")
    rec = run_cell(cell, PROVIDERS, torch.device("cpu"), FAST, seed=0)
    assert rec["status"] == "ok", rec
    plain = rec["providers"]["fusedce"]
    tol = 1e-5 if dtype == "fp32" else 1e-2
    for name in EXTRAS:
        res = rec["providers"][name]
        assert res["status"] == "ok", (name, res)
        assert res["extras"] == EXTRAS[name].text()
        assert res["loss_rel_err"] < tol, (name, res)
        assert res["ref_loss"] != pytest.approx(rec["ref_loss"], rel=1e-3)  # its own loss
        assert res["vs_plain"] == pytest.approx(res["ms"] / plain["ms"])
        if mode == "fwd_bwd":
            assert res["grad_rel_err"] < tol, (name, res)
    assert "vs_plain" not in plain

    lines = summary_table([rec])
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(head) == len(row) == lines[1].count("---")
    for column, name in EXTRAS_COLUMNS.items():
        assert float(row[head.index(column)]) == pytest.approx(
            rec["providers"][name]["vs_plain"], abs=1e-3
        )
    report = {
        "env": {
            "card": "CPU", "date": "2026-01-01", "torch": "t", "triton": None,
            "liger_kernel": None, "python": "3", "git_commit": "c", "timing": "t",
            "inputs": "i", "pct_copy": "p", "device": "cpu",
        },
        "notes": [], "cells": [rec], "skipped": [], "elapsed_s": 0.0,
    }  # fmt: skip
    text = markdown(report)
    assert "extras / plain" in text and "`fusedce_all`: logit_scale=0.5" in text
