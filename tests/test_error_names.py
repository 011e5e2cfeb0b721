"""Every error names the public function the user called, and ``process_group`` is checked.

One sweep: each public entry point (the functions, the modules, the vocabulary-parallel
functions without a process group, i.e. the plain path) with a bad class index (on the
small-call shortcut, on the row contract, with and without a gradient), a bad class-weight
shape and bad dtypes; the message starts with that function's name, never with the name of
the function it calls internally. The sharded path and groups of one rank are swept over gloo
in ``test_vocab_parallel_agreement.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import fusedce
from fusedce import index_check
from fusedce.vocab_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

D = 4
IGNORE = -100


def _case(classes: int, rows: int = 6, grad: bool = False) -> SimpleNamespace:
    """Good arguments for every entry point: logits (rows, classes), hidden states (rows, D),
    the (classes, D) head, class indices (one ignored) and no class weights."""
    g = torch.Generator().manual_seed(classes)
    target = torch.randint(classes, (rows,), generator=g)
    target[1] = IGNORE
    return SimpleNamespace(
        logits=torch.randn(rows, classes, generator=g).requires_grad_(grad),
        hidden=torch.randn(rows, D, generator=g).requires_grad_(grad),
        head=torch.randn(classes, D, generator=g),
        target=target,
        weight=None,
        reduction="mean",
    )


def _module(a: SimpleNamespace) -> fusedce.CrossEntropyLoss:
    return fusedce.CrossEntropyLoss(weight=a.weight, reduction=a.reduction)


def _linear_module(a: SimpleNamespace) -> fusedce.LinearCrossEntropyLoss:
    classes = a.head.shape[0]
    module = fusedce.LinearCrossEntropyLoss(D, classes, weight=a.weight, reduction=a.reduction)
    with torch.no_grad():
        module.linear.weight.copy_(a.head)
    return module


# Each public entry point, called with the arguments of a case.
ENTRY_POINTS = {
    "cross_entropy": lambda a: fusedce.cross_entropy(
        a.logits, a.target, a.weight, reduction=a.reduction
    ),
    "CrossEntropyLoss": lambda a: _module(a)(a.logits, a.target),
    "linear_cross_entropy": lambda a: fusedce.linear_cross_entropy(
        a.hidden, a.head, a.target, weight=a.weight, reduction=a.reduction
    ),
    "LinearCrossEntropyLoss": lambda a: _linear_module(a)(a.hidden, a.target),
    "vocab_parallel_cross_entropy": lambda a: vocab_parallel_cross_entropy(
        a.logits, a.target, a.weight, reduction=a.reduction
    ),
    "vocab_parallel_linear_cross_entropy": lambda a: vocab_parallel_linear_cross_entropy(
        a.hidden, a.head, a.target, weight=a.weight, reduction=a.reduction
    ),
}


def _bad(kind: str, a: SimpleNamespace) -> tuple[type[Exception], str]:
    """Spoils case ``a`` as ``kind`` says; returns the expected exception and a fragment."""
    classes = a.head.shape[0]
    if kind == "class index":
        a.target = a.target.clone()
        a.target[3] = classes
        return IndexError, f"target class index {classes} is out of bounds"
    if kind == "negative class index":
        a.target = a.target.clone()
        a.target[0] = -3
        return IndexError, "target class index -3 is out of bounds"
    if kind == "weight shape":
        a.weight = torch.ones(classes + 1)
        return ValueError, "weight must be a 1-D tensor"
    if kind == "target dtype":
        a.target = a.target.to(torch.int16)
        return TypeError, "class-index targets must be int64, int32 or uint8"
    if kind == "input dtype":
        a.logits, a.hidden = a.logits.detach().long(), a.hidden.detach().long()
        return TypeError, "must be a floating tensor"
    raise AssertionError(kind)


def _message(fn) -> str:
    try:
        fn()
    except Exception as e:  # the test reads any exception's message
        return f"{type(e).__name__}: {e}"
    raise AssertionError("no exception")


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    "kind", ["class index", "negative class index", "weight shape", "target dtype", "input dtype"]
)
def test_errors_name_the_function_called(name: str, kind: str) -> None:
    a = _case(11)
    exc, fragment = _bad(kind, a)
    with pytest.raises(exc) as info:
        ENTRY_POINTS[name](a)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert fragment in message, message
    assert index_check.current_caller() == "cross_entropy"  # restored after the error


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_index_errors_of_the_row_contract_name_the_function(
    name: str, reduction: str, grad: bool
) -> None:
    """Past the small-call shortcut (6 x 8192 logits): the index check of the row contract
    (``core``) and of the fused head's chunks, with and without a gradient (the autograd
    Function, which on CUDA defers the check and keeps the name)."""
    a = _case(8192, grad=grad)
    a.reduction = reduction
    _, fragment = _bad("class index", a)
    message = _message(lambda: ENTRY_POINTS[name](a))
    assert message.startswith(f"IndexError: {name}: "), message
    assert fragment in message, message
    assert index_check.current_caller() == "cross_entropy"


def test_backward_errors_name_the_module() -> None:
    """Backward twice through the same graph: the module's name, not the function's."""
    a = _case(11, grad=True)
    loss = ENTRY_POINTS["CrossEntropyLoss"](_case(8192, grad=True))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^fusedce\.CrossEntropyLoss: backward ran twice"):
        loss.backward()
    loss = ENTRY_POINTS["LinearCrossEntropyLoss"](a)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^fusedce\.LinearCrossEntropyLoss: backward ran"):
        loss.backward()


# The entry points that take a process_group, called with one.
GROUP_ENTRY_POINTS = {
    "cross_entropy": lambda a, g: fusedce.cross_entropy(a.logits, a.target, process_group=g),
    "linear_cross_entropy": lambda a, g: fusedce.linear_cross_entropy(
        a.hidden, a.head, a.target, process_group=g
    ),
    "vocab_parallel_cross_entropy": lambda a, g: vocab_parallel_cross_entropy(
        a.logits, a.target, process_group=g
    ),
    "vocab_parallel_linear_cross_entropy": lambda a, g: vocab_parallel_linear_cross_entropy(
        a.hidden, a.head, a.target, process_group=g
    ),
}


@pytest.mark.parametrize("name", list(GROUP_ENTRY_POINTS))
def test_process_group_must_be_a_process_group(name: str) -> None:
    assert not dist.is_initialized()
    a = _case(11)
    call = GROUP_ENTRY_POINTS[name]
    for group in (object(), "WORLD", 3, 1.5):
        with pytest.raises(TypeError) as info:
            call(a, group)
        message = str(info.value)
        assert message.startswith(f"{name}: process_group must be a "), message
        assert "torch.distributed.ProcessGroup or None" in message, message
        assert type(group).__name__ in message, message
    # A real group, but torch.distributed was never initialised (or was destroyed since).
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(RuntimeError, match=rf"^{name}: process_group was given but torch"):
        call(a, group)
    # torch.distributed.group.WORLD is None before init_process_group: it means no group, as
    # None does (nothing tells the two apart), so the call is the plain function.
    assert dist.group.WORLD is None
    torch.testing.assert_close(call(a, dist.group.WORLD), call(a, None), rtol=0, atol=0)
