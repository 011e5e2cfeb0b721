"""``fusedce.distillation_loss`` against the float64 reference built from the definitions
(tests/distill_reference.py): every divergence x tail x dense / sparse x hard_weight x
temperature x reduction x dtype, the edge shapes, and the errors. A kernel test: it runs through
the Triton interpreter and through the torch backend (``make test``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from distill_reference import GRAD_RTOL, LOSS_ATOL, reference, rel_err, sparse_teacher

import fusedce
from fusedce.backends import torch_distill
from fusedce.distillation import core as distill_core
from fusedce.distillation.api import distillation_loss

triton_distill = distill_core.triton_distill

pytestmark = pytest.mark.kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = ["dense", "bin", "renormalize"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
# (temperature, hard_weight, with target, reduction, beta): the plain call; the cross-entropy
# mixed in at T = 1 (it shares the student's row statistics) and at T = 2 (its own), with
# ignored rows; the cross-entropy alone (a = 1) at T < 1; the JSD's end points beta = 0 and 1
# ride along where the divergence is "jsd".
VARIANTS = [
    (1.0, 0.0, False, "mean", 0.5),
    (1.0, 0.5, True, "mean", 0.7),
    (2.0, 0.3, True, "sum", 0.0),
    (0.5, 1.0, True, "none", 1.0),
    (1.5, 0.0, True, "none", 0.25),
]


def _inputs(shape, V, k, pad, dtype, form, random_seed=0):
    g = torch.Generator().manual_seed(random_seed)
    logits = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    kw = {}
    N = int(torch.tensor(shape).prod()) if shape else 1
    if form == "dense":
        kw["teacher_logits"] = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    else:
        ids, logp = sparse_teacher(N, V, k, pad=pad, random_seed=random_seed + 1)
        kw["teacher_ids"] = ids.reshape(*shape, k)
        kw["teacher_log_probs"] = logp.reshape(*shape, k)
        kw["tail"] = form
    return logits, kw


def _check(logits, kw, upstream=None):
    x = logits.clone().requires_grad_(True)
    loss = distillation_loss(x, **kw)
    # A scalar upstream gradient other than 1: backward scales the fused gradient.
    up = upstream if upstream is not None else torch.full_like(loss, 0.7)
    (loss * up).sum().backward()
    ref_loss, ref_grad = reference(logits, **kw, upstream=up)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    rtol = 1e-10 if logits.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, atol=LOSS_ATOL[logits.dtype], rtol=rtol)
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert rel_err(x.grad, ref_grad) < GRAD_RTOL[logits.dtype], rel_err(x.grad, ref_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_float64_reference(divergence, form, dtype):
    # (3, 4) leading shape: a batch x sequence layout; V = 37, prime; k = 6 with 2 padded ids.
    logits, kw = _inputs((3, 4), 37, 6, 2, dtype, form)
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 37, (3, 4), generator=g)
    target[0, 1] = target[2, 3] = -100
    for T, a, with_target, reduction, beta in VARIANTS:
        opts = dict(kw, divergence=divergence, temperature=T, hard_weight=a, reduction=reduction)
        opts["beta"] = beta
        if with_target:
            opts["target"] = target
        up = torch.randn(3, 4, generator=g) if reduction == "none" else None
        _check(logits, opts, up)


@pytest.mark.parametrize(
    "V, k, pad, shape",
    [
        (1, 1, 0, (5,)),  # one class: q = p = 1, every divergence 0
        (2, 1, 0, (4,)),  # two classes, k = 1: the tail bin is the other class
        (2, 2, 1, (3,)),  # k = V with a padded id
        (1031, 7, 3, (3,)),  # a prime above the interpreter's block: several tiles, masked end
        (11, 11, 0, (2, 2)),  # k = V: the whole distribution given sparsely
        (13, 4, 4, (3,)),  # every id padded: the bin holds everything, renormalize gives 0
        (17, 3, 0, (1,)),  # N = 1
        (17, 3, 0, (0,)),  # N = 0
    ],
)
def test_edge_shapes(V, k, pad, shape):
    for form, divergence in itertools.product(FORMS, DIVERGENCES):
        k_ = min(k, V)
        mass = 1.0 if k_ == V and pad == 0 else 0.8
        logits = (torch.randn(*shape, V) * 3).float()
        if form == "dense":
            kw = {"teacher_logits": torch.randn(*shape, V) * 3}
        else:
            N = shape[0] if shape else 1
            N = int(torch.tensor(shape).prod())
            ids, logp = sparse_teacher(max(N, 1), V, k_, pad=min(pad, k_), mass=mass)
            kw = {
                "teacher_ids": ids[:N].reshape(*shape, k_),
                "teacher_log_probs": logp[:N].reshape(*shape, k_),
                "tail": form,
            }
        kw["divergence"] = divergence
        _check(logits, kw)


def test_shift_exact_and_non_contiguous():
    # A common offset of 1e6 on the student's row and another on the teacher's changes
    # nothing (float32 spacing there is 0.06: forming lse and subtracting would lose it all);
    # the logits are a transposed (non-contiguous) view.
    V = 29
    # The offset inputs are rounded to the spacing 0.0625; the reference sees those rounded
    # values without the offset (the float32 subtraction of 1e6 from them is exact).
    base = ((torch.randn(V, 6) * 3 + 1e6) - 1e6).contiguous()
    teacher = (torch.randn(6, V) * 3 + 1e6) - 1e6
    for divergence in DIVERGENCES:
        kw = {"teacher_logits": teacher + 1e6, "divergence": divergence}
        x = (base + 1e6).t().requires_grad_(True)
        loss = distillation_loss(x, **kw)
        loss.backward()
        ref_loss, ref_grad = reference(base.t(), teacher_logits=teacher, divergence=divergence)
        torch.testing.assert_close(loss.double(), ref_loss, atol=3e-5, rtol=1e-5)
        assert rel_err(x.grad, ref_grad) < 3e-5
        ids, logp = sparse_teacher(6, V, 5, pad=1)
        kw = {"teacher_ids": ids, "teacher_log_probs": logp, "divergence": divergence}
        x = (base + 1e6).t().requires_grad_(True)
        distillation_loss(x, **kw).backward()
        _, ref_grad = reference(base.t(), **kw)
        assert rel_err(x.grad, ref_grad) < 3e-5


def test_float64_and_no_grad():
    logits, kw = _inputs((4,), 23, 5, 1, torch.float64, "bin")
    _check(logits, dict(kw, divergence="jsd", beta=0.3, temperature=1.7))
    with torch.no_grad():
        out = distillation_loss(logits, **kw, reduction="none")
    torch.testing.assert_close(out, reference(logits, **kw, reduction="none")[0])


def test_errors():
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    ids, logp = sparse_teacher(4, 10, 3)
    f = distillation_loss
    cases = [
        (ValueError, "pass the teacher", lambda: f(x)),
        (
            ValueError,
            "not both",
            lambda: f(x, teacher_logits=t, teacher_ids=ids, teacher_log_probs=logp),
        ),
        (ValueError, "go together", lambda: f(x, teacher_ids=ids)),
        (ValueError, "requires grad", lambda: f(x, teacher_logits=t.clone().requires_grad_())),
        (
            ValueError,
            "requires grad",
            lambda: f(x, teacher_ids=ids, teacher_log_probs=logp.clone().requires_grad_()),
        ),
        (ValueError, "shape", lambda: f(x, teacher_logits=t[:3])),
        (TypeError, "dtype|float64", lambda: f(x, teacher_logits=t.double())),
        (TypeError, "int64", lambda: f(x, teacher_ids=ids.int(), teacher_log_probs=logp)),
        (ValueError, "same shape", lambda: f(x, teacher_ids=ids, teacher_log_probs=logp[:, :2])),
        (ValueError, "k = 0", lambda: f(x, teacher_ids=ids[:, :0], teacher_log_probs=logp[:, :0])),
        (
            IndexError,
            "out of bounds",
            lambda: f(x, teacher_ids=ids.clamp_min(0) + 10, teacher_log_probs=logp),
        ),
        (IndexError, "out of bounds", lambda: f(x, teacher_ids=ids - 5, teacher_log_probs=logp)),
        (
            IndexError,
            "twice",
            lambda: f(x, teacher_ids=ids[:, [0, 0, 1]], teacher_log_probs=logp - 2),
        ),
        (ValueError, "above 1", lambda: f(x, teacher_ids=ids, teacher_log_probs=logp + 0.2)),
        (
            IndexError,
            "target class index",
            lambda: f(x, teacher_logits=t, target=torch.tensor([0, 1, 10, 2])),
        ),
        (ValueError, "pass target", lambda: f(x, teacher_logits=t, hard_weight=0.5)),
        (ValueError, "divergence", lambda: f(x, teacher_logits=t, divergence="kl")),
        (ValueError, "tail", lambda: f(x, teacher_logits=t, tail="drop")),
        (ValueError, "beta", lambda: f(x, teacher_logits=t, beta=1.5)),
        (ValueError, "temperature", lambda: f(x, teacher_logits=t, temperature=0.0)),
        (ValueError, "hard_weight", lambda: f(x, teacher_logits=t, hard_weight=-0.1)),
        (ValueError, "reduction", lambda: f(x, teacher_logits=t, reduction="avg")),
        (TypeError, "int64, int32", lambda: f(x, teacher_logits=t, target=torch.zeros(4))),
        (
            ValueError,
            "leading shape",
            lambda: f(x, teacher_logits=t, target=torch.zeros(3, dtype=torch.long)),
        ),
        (
            RuntimeError,
            "process_group is given but torch.distributed is not initialised",
            lambda: f(x, teacher_logits=t, process_group=object()),
        ),
    ]
    for kind, match, call in cases:
        with pytest.raises(kind, match=match) as info:
            call()
        assert str(info.value).startswith("distillation_loss"), str(info.value)
    # Mass within rounding passes: bfloat16 log-probabilities of a full distribution.
    full = torch.log_softmax(torch.randn(4, 10), -1).bfloat16()
    f(x, teacher_ids=torch.arange(10).expand(4, 10).contiguous(), teacher_log_probs=full)
    assert fusedce is not None


def test_rows_run_on_the_backend_in_effect():
    # Under TRITON_INTERPRET=1 the Triton kernel computes the rows (the tests above check its
    # numbers), with FUSEDCE_BACKEND=torch the torch rows: a wrapper counts the calls.
    backend = "triton" if fusedce.uses_triton(torch.empty(0)) else "torch"
    module = triton_distill if backend == "triton" else torch_distill
    calls = []
    original = module.run_rows

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.run_rows = counting
    try:
        x = torch.randn(3, 10, requires_grad=True)
        distillation_loss(x, teacher_logits=torch.randn(3, 10)).backward()
    finally:
        module.run_rows = original
    assert calls == [1]


def test_several_row_blocks(monkeypatch):
    # The torch rows work through CPU rows in blocks (1 MiB); shrunk to 4 KiB here, 20 rows of
    # 131 classes are blocks of 7, 7 and 6 rows (the kernel runs one program per
    # row: nothing changes there). One divergence per teacher form.
    monkeypatch.setattr(torch_distill, "CPU_ROW_BLOCK_BYTES", 4096)
    logits = torch.randn(20, 131) * 3
    ids, logp = sparse_teacher(20, 131, 9, pad=2)
    target = torch.randint(0, 131, (20,))
    cases = [
        {"teacher_logits": torch.randn(20, 131) * 3, "divergence": "jsd"},
        {"teacher_ids": ids, "teacher_log_probs": logp, "divergence": "reverse_kl"},
        {"teacher_ids": ids, "teacher_log_probs": logp, "tail": "renormalize"},
    ]
    for kw in cases:
        _check(logits, dict(kw, target=target, hard_weight=0.2, temperature=1.3))


def test_unchecked_bad_values_give_nan_rows():
    # With the value check off, an id or class index out of range is never read: its row's
    # loss and gradient are NaN, the other rows exact.
    x = torch.randn(4, 10)
    ids, logp = sparse_teacher(4, 10, 3)
    ids[1, 0] = 12
    target = torch.tensor([0, 1, 2, 30])
    fusedce.set_target_check(False)
    try:
        xs = x.clone().requires_grad_()
        kw = {"teacher_ids": ids, "teacher_log_probs": logp, "target": target, "hard_weight": 0.5}
        loss = distillation_loss(xs, **kw, reduction="none")
        loss.sum().backward()
    finally:
        fusedce.set_target_check(True)
    assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(xs.grad[[1, 3]]).all()
    good = [0, 2]
    sub = {"teacher_ids": ids[good], "teacher_log_probs": logp[good], "target": target[good]}
    ref_loss, ref_grad = reference(x[good], **sub, hard_weight=0.5, reduction="none")
    torch.testing.assert_close(loss[good].double(), ref_loss, atol=3e-5, rtol=1e-5)
    assert rel_err(xs.grad[good], ref_grad) < 3e-5
