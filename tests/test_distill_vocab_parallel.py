"""The distillation losses over vocabulary slices on real process groups: 2 and 3 CPU processes
over gloo. Every rank builds the same full tensors from one random seed, computes the float64
reference of the UNSHARDED loss (tests/distill_reference.py) and compares the loss and its own
slice of the gradient; one set of processes per world size checks every case.

A kernel test: under TRITON_INTERPRET=1 the slices' O(N V_r) passes of the kernel dtypes run
the Triton kernels of ``backends.triton_distill_slices`` (the workers count their launches),
with FUSEDCE_BACKEND=torch the torch ops; float64 always the torch ops."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from distill_reference import GRAD_RTOL, LOSS_ATOL, reference, rel_err, sparse_teacher
from test_vocab_parallel import _spawn

import fusedce
from fusedce.sharded import distillation as sharded

pytestmark = pytest.mark.kernel

V, N, D, Dt, K = 37, 6, 8, 5, 5


def _dtypes() -> tuple[torch.dtype, ...]:
    """float32, and float64 where the rows run on torch: float64 always takes the torch slices,
    so under the interpreter (the kernels' run) it would repeat the torch-backend run exactly."""
    on_triton = fusedce.uses_triton(torch.empty(0))
    return (torch.float32,) if on_triton else (torch.float32, torch.float64)


def _slice(widths: list[int], rank: int) -> slice:
    v0 = sum(widths[:rank])
    return slice(v0, v0 + widths[rank])


def _check_logits(rank: int, widths: list[int], group) -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    ids, logp = sparse_teacher(N, V, K, pad=1)
    target = torch.randint(0, V, (N,), generator=g)
    target[2] = -100
    up = torch.randn(N, generator=g, dtype=torch.float64)
    s = _slice(widths, rank)
    forms = [
        {"teacher_logits": teacher},
        {"teacher_ids": ids, "teacher_log_probs": logp, "tail": "bin"},
        {"teacher_ids": ids, "teacher_log_probs": logp, "tail": "renormalize"},
    ]
    # (divergence, T, hard_weight, target, reduction) rotating over the forms.
    variants = [
        ("forward_kl", 1.0, 0.0, None, "mean"),
        ("reverse_kl", 2.0, 0.3, target, "none"),
        ("jsd", 0.7, 0.0, target, "sum"),
        ("forward_kl", 1.5, 1.0, target, "mean"),
    ]
    for form, (div, T, a, y, red), dtype in itertools.product(forms, variants, _dtypes()):
        kw = dict(form, divergence=div, temperature=T, hard_weight=a, target=y, reduction=red)
        ref_loss, ref_grad = reference(
            logits.to(dtype), **kw, upstream=up if red == "none" else None
        )
        local = dict(kw)
        if "teacher_logits" in local:
            local["teacher_logits"] = teacher[:, s].to(dtype)
        x = logits[:, s].to(dtype).requires_grad_(True)
        loss = fusedce.distillation_loss(x, **local, process_group=group)
        (loss * (up.to(loss.dtype) if red == "none" else 1.0)).sum().backward()
        tol = 1e-10 if dtype == torch.float64 else 3e-5
        torch.testing.assert_close(loss.double(), ref_loss, atol=tol, rtol=tol)
        err = rel_err(x.grad, ref_grad[:, s])
        what = (rank, widths, div, T, a, red, dtype, err, list(form)[-1])
        assert err < tol or ref_grad[:, s].numel() == 0, what


def _check_edges(rank: int, widths: list[int], group) -> None:
    """k = 1 (most slices hold none of a row's ids), half-precision logits (a dense teacher's
    too), ignored rows, the cross-entropy alone and at T != 1: the float64 reference of the
    rounded inputs, at the unsharded tests' tolerances of each dtype."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    one_id = dict(zip(("teacher_ids", "teacher_log_probs"), sparse_teacher(N, V, 1), strict=True))
    some = dict(zip(("teacher_ids", "teacher_log_probs"), sparse_teacher(N, V, K), strict=True))
    target = torch.randint(0, V, (N,), generator=g)
    target[[0, 3]] = -100
    up = torch.randn(N, generator=g, dtype=torch.float64)
    s = _slice(widths, rank)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cases = [
        (f32, one_id, {"reduction": "sum"}),
        (f32, one_id | {"tail": "renormalize"}, {"divergence": "jsd", "hard_weight": 0.5}),
        (bf16, one_id, {"hard_weight": 0.4, "temperature": 1.3, "reduction": "none"}),
        (bf16, {"teacher_logits": teacher}, {"divergence": "jsd", "temperature": 0.8}),
        (f16, {"teacher_logits": teacher}, {"divergence": "reverse_kl", "hard_weight": 0.3}),
        (f16, some, {"divergence": "forward_kl", "temperature": 2.0, "reduction": "none"}),
        (bf16, some, {"hard_weight": 1.0, "temperature": 0.5, "reduction": "sum"}),
    ]
    for dtype, teach, kw in cases:
        kw = dict(kw, target=target)
        per_row = kw.get("reduction") == "none"
        ref_teach = dict(teach)
        if "teacher_logits" in teach:
            ref_teach["teacher_logits"] = teacher.to(dtype)
            teach = dict(teach, teacher_logits=teacher[:, s].to(dtype))
        ref_loss, ref_grad = reference(
            logits.to(dtype), **ref_teach, **kw, upstream=up if per_row else None
        )
        x = logits[:, s].to(dtype).requires_grad_(True)
        loss = fusedce.distillation_loss(x, **teach, **kw, process_group=group)
        (loss * (up.to(loss.dtype) if per_row else 1.0)).sum().backward()
        tol = LOSS_ATOL[dtype]
        torch.testing.assert_close(loss.double(), ref_loss, atol=tol, rtol=tol)
        err = rel_err(x.grad, ref_grad[:, s])
        what = (rank, widths, dtype, kw, err, list(teach))
        assert err < GRAD_RTOL[dtype] or ref_grad[:, s].numel() == 0, what


def _check_padding_rows(rank: int, widths: list[int], group) -> None:
    """An ignored row whose logits are all -inf (padding): its gradient is 0, not NaN, and the
    loss is that of the other rows, on every backend's slices."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    ids, logp = sparse_teacher(N, V, K)
    target = torch.randint(0, V, (N,), generator=g)
    target[0] = -100
    padded = logits.clone()
    padded[0] = float("-inf")
    s = _slice(widths, rank)
    kw = {"hard_weight": 0.3, "reduction": "sum", "temperature": 1.5}
    for dense in (True, False):
        teach = (
            {"teacher_logits": teacher}
            if dense
            else {"teacher_ids": ids, "teacher_log_probs": logp}
        )
        ref_teach = {k: v[1:] for k, v in teach.items()}
        ref_loss, ref_grad = reference(logits[1:], **ref_teach, target=target[1:], **kw)
        if dense:
            teach = {"teacher_logits": teacher[:, s].float()}
        x = padded[:, s].float().requires_grad_(True)
        loss = fusedce.distillation_loss(x, **teach, target=target, **kw, process_group=group)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, atol=3e-5, rtol=3e-5)
        assert (x.grad[0] == 0).all(), (rank, dense, x.grad[0])
        assert rel_err(x.grad[1:], ref_grad[:, s]) < 3e-5 or x.grad.numel() == 0, (rank, dense)


def _check_linear(rank: int, widths: list[int], group) -> None:
    g = torch.Generator().manual_seed(9)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    th = torch.randn(N, Dt, generator=g, dtype=torch.float64)
    tW = torch.randn(V, Dt, generator=g, dtype=torch.float64) * 0.5
    ids, logp = sparse_teacher(N, V, K, pad=1)
    target = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    s = _slice(widths, rank)
    # float32 runs the slices' kernels under the interpreter (the head's chunks of 4 rows).
    cases = ((True, "mean"), (False, "none"), (False, "sum"))
    for (dense, red), dtype in itertools.product(cases, _dtypes()):
        kw = {"divergence": "jsd", "target": target, "hard_weight": 0.2, "reduction": red}
        h_, W_, b_, th_, tW_ = (t.to(dtype) for t in (h, W, b, th, tW))
        hs, Ws, bs = h_.clone().requires_grad_(), W_[s].clone().requires_grad_(), b_[s].clone()
        bs.requires_grad_()
        if dense:
            teach = {"teacher_input": th_, "teacher_weight": tW_[s]}
            ref_teacher = {"teacher_logits": th_.double() @ tW_.double().t()}
        else:
            teach = ref_teacher = {"teacher_ids": ids, "teacher_log_probs": logp}
        loss = fusedce.linear_distillation_loss(
            hs, Ws, linear_bias=bs, **teach, **kw, chunk_size=4, process_group=group
        )
        (loss * (up.to(dtype) if red == "none" else 1.0)).sum().backward()
        hr, Wr, br = (t.double().clone().requires_grad_() for t in (h_, W_, b_))
        logits = hr @ Wr.t() + br
        ref_loss, g_logits = reference(
            logits.detach(), **ref_teacher, **kw, upstream=up if red == "none" else None
        )
        gh, gW, gb = torch.autograd.grad(logits, (hr, Wr, br), g_logits)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(loss.double(), ref_loss, atol=tol, rtol=tol)
        assert rel_err(hs.grad, gh) < tol
        assert rel_err(Ws.grad, gW[s]) < tol or Ws.numel() == 0
        assert rel_err(bs.grad, gb[s]) < tol or bs.numel() == 0


def _check_errors(rank: int, world: int, group) -> None:
    """Arguments refused on one rank only: every rank raises (none waits for the others), and
    the group stays usable."""
    s = _slice([len(c) for c in torch.arange(V).chunk(world)], rank)
    x = torch.randn(N, V)[:, s].requires_grad_()
    h, W = torch.randn(N, D), torch.randn(V, D)[s]
    ids, logp = sparse_teacher(N, V, K)
    last = rank == world - 1
    cases = [
        # the last rank's teacher slice has the wrong width / a bad option there
        lambda: fusedce.distillation_loss(
            x, teacher_logits=torch.randn(N, x.shape[1] + int(last)), process_group=group
        ),
        lambda: fusedce.linear_distillation_loss(
            h, W, teacher_ids=ids, teacher_log_probs=logp, beta=2.0 if last else 0.5,
            divergence="jsd", process_group=group,
        ),
    ]  # fmt: skip
    for call in cases:
        match = "teacher_logits|beta" if last else "were refused"
        with pytest.raises(ValueError, match=match):
            call()
    loss = fusedce.distillation_loss(
        x, teacher_ids=ids, teacher_log_probs=logp, process_group=group
    )
    assert torch.isfinite(loss)


def _check_dtensor(rank: int, world: int) -> None:
    """DTensor logits sharded on the class dimension (the dense teacher's alike, a sparse one
    plain or replicated) and a DTensor head sharded by rows: replicated DTensor losses, the
    unsharded values and gradients."""
    # Optional: torch.distributed.tensor exists only in torch builds with distributed.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    ids, logp = sparse_teacher(N, V, K, pad=1)
    target = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    rep = lambda t: distribute_tensor(t, mesh, [Replicate()])
    cols = lambda t: distribute_tensor(t, mesh, [Shard(-1)])
    rows = lambda t: distribute_tensor(t, mesh, [Shard(0)])
    cases = [  # (the DTensor call's teacher, the reference's, the options)
        ({"teacher_logits": cols(teacher)}, {"teacher_logits": teacher}, {"temperature": 1.5}),
        (
            {"teacher_ids": ids, "teacher_log_probs": logp},
            {"teacher_ids": ids, "teacher_log_probs": logp},
            {"divergence": "reverse_kl", "reduction": "none", "target": target, "hard_weight": 0.3},
        ),
        (
            {"teacher_ids": rep(ids), "teacher_log_probs": rep(logp), "target": rep(target)},
            {"teacher_ids": ids, "teacher_log_probs": logp, "target": target},
            {"divergence": "jsd", "tail": "renormalize", "reduction": "sum", "hard_weight": 0.5},
        ),
    ]
    for teach, ref_teach, kw in cases:
        per_row = kw.get("reduction") == "none"
        ref_loss, ref_grad = reference(logits, **ref_teach, **kw, upstream=up if per_row else None)
        dt = cols(logits).requires_grad_()
        loss = fusedce.distillation_loss(dt, **teach, **kw)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), kw
        (loss.to_local() * (up if per_row else 1.0)).sum().backward()
        torch.testing.assert_close(loss.to_local(), ref_loss, atol=1e-10, rtol=1e-10)
        assert isinstance(dt.grad, DTensor) and dt.grad.placements == dt.placements
        assert rel_err(dt.grad.full_tensor(), ref_grad) < 1e-10, (rank, world, kw)

    # The head: a DTensor weight (and bias, and dense teacher head) sharded by rows.
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    th = torch.randn(N, Dt, generator=g, dtype=torch.float64)
    tW = torch.randn(V, Dt, generator=g, dtype=torch.float64) * 0.5
    for dense, red in ((True, "mean"), (False, "none")):
        kw = {"divergence": "jsd", "target": target, "hard_weight": 0.2, "reduction": red}
        if dense:
            teach = {"teacher_input": th, "teacher_weight": rows(tW)}
            ref_teach = {"teacher_logits": th @ tW.t()}
        else:
            teach = ref_teach = {"teacher_ids": ids, "teacher_log_probs": logp}
        hs = h.clone().requires_grad_()
        Ws, bs = rows(W).requires_grad_(), rows(b).requires_grad_()
        loss = fusedce.linear_distillation_loss(hs, Ws, linear_bias=bs, **teach, **kw, chunk_size=4)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), kw
        (loss.to_local() * (up if red == "none" else 1.0)).sum().backward()
        hr, Wr, br = (t.clone().requires_grad_() for t in (h, W, b))
        full = hr @ Wr.t() + br
        ref_loss, g_logits = reference(
            full.detach(), **ref_teach, **kw, upstream=up if red == "none" else None
        )
        gh, gW, gb = torch.autograd.grad(full, (hr, Wr, br), g_logits)
        torch.testing.assert_close(loss.to_local(), ref_loss, atol=1e-10, rtol=1e-10)
        assert rel_err(hs.grad, gh) < 1e-10
        assert rel_err(Ws.grad.full_tensor(), gW) < 1e-10
        assert rel_err(bs.grad.full_tensor(), gb) < 1e-10

    # Other placements: the same error on every rank, before any collective.
    with pytest.raises(ValueError, match=r"^distillation_loss: .*Shard\(-1\)"):
        fusedce.distillation_loss(rows(logits), teacher_logits=rows(teacher))
    with pytest.raises(ValueError, match=r"^distillation_loss: .*teacher_logits"):
        fusedce.distillation_loss(cols(logits), teacher_logits=rep(teacher))
    with pytest.raises(ValueError, match=r"^linear_distillation_loss: .*Shard\(0\)"):
        fusedce.linear_distillation_loss(h, rep(W), teacher_ids=ids, teacher_log_probs=logp)
    with pytest.raises(ValueError, match=r"^linear_distillation_loss: .*teacher_weight"):
        fusedce.linear_distillation_loss(h, rows(W), teacher_input=th, teacher_weight=tW)


def _counting_launches() -> list[str]:
    """Wraps the launchers of the slices' kernels (where Triton imports) to record their names
    in the list returned."""
    launches: list[str] = []
    module = sharded.triton_distill_slices

    def counting(name: str):
        launch = getattr(module, name)

        def counted(*args, **kwargs):
            launches.append(name)
            return launch(*args, **kwargs)

        return counted

    for name in ("slice_stats", "slice_sums", "slice_grad") if module is not None else ():
        setattr(module, name, counting(name))
    return launches


def _worker(rank: int, world: int, _local: str = "") -> None:
    group = dist.group.WORLD
    launches = _counting_launches()
    even = [len(c) for c in torch.arange(V).chunk(world)]
    # Uneven slices: one of a single class (V_r = 1), and one holding no class on 3 ranks.
    skewed = [1, V - 1] if world == 2 else [20, 0, V - 20]
    for widths in (even, skewed):
        _check_logits(rank, widths, group)
        _check_edges(rank, widths, group)
        _check_padding_rows(rank, widths, group)
        _check_linear(rank, widths, group)
    _check_errors(rank, world, group)
    _check_dtensor(rank, world)
    # The Triton path was taken exactly where the Triton rows would be: every launcher ran.
    if fusedce.uses_triton(torch.empty(0)):
        assert set(launches) == {"slice_stats", "slice_sums", "slice_grad"}, launches
    else:
        assert not launches, launches


def test_slices_run_on_the_backend_in_effect() -> None:
    """The slices' kernels where the rows of these logits run on Triton (under
    TRITON_INTERPRET=1: CPU tensors of the kernel dtypes, unless FUSEDCE_BACKEND=torch), the
    torch ops elsewhere; float64 always the torch ops."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.zeros(2, 3, dtype=dtype)
        triton = fusedce.uses_triton(x)
        assert triton == (dtype != torch.float64 and fusedce.uses_triton(torch.empty(0)))
        assert (sharded.slices_backend(x) is not None) == triton, dtype
    if os.environ.get("TRITON_INTERPRET") == "1" and fusedce.get_backend() != "torch":
        # The interpreter run must really take the kernels.
        assert sharded.slices_backend(torch.zeros(2, 3)) is not None
    with fusedce.use_backend("torch"):
        assert sharded.slices_backend(torch.zeros(2, 3)) is None


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_distillation_matches_unsharded(world: int, tmp_path) -> None:
    _spawn(world, tmp_path, timeout_s=240.0, worker=_worker)


def _worker_tiles(rank: int, world: int, local: str = "") -> None:
    """Slices wider than the interpreter's tile (1024 columns): the kernels' loops over several
    tiles with a masked end. The float64 reference at the float32 tolerance, and the torch
    slices' numbers (``use_backend("torch")``) to float32 rounding. ``local == "cuda"``: the
    tensors on the GPU (the compiled kernels), else on the CPU."""
    group = dist.group.WORLD
    device = torch.device("cuda" if local == "cuda" else "cpu")
    launches = _counting_launches()
    widths = [1031, 1069]
    vocab, s = sum(widths), _slice(widths, rank)
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(3, vocab, generator=g, dtype=torch.float64) * 4
    teacher = torch.randn(3, vocab, generator=g, dtype=torch.float64) * 4
    ids, logp = sparse_teacher(3, vocab, 7, pad=2)
    target = torch.tensor([5, -100, 2000])
    up = torch.randn(3, generator=g, dtype=torch.float64)
    sparse = {"teacher_ids": ids.to(device), "teacher_log_probs": logp.to(device)}
    cases = [
        ({"teacher_logits": teacher}, {"divergence": "forward_kl"}),
        (
            {"teacher_logits": teacher},
            {"divergence": "jsd", "temperature": 1.5, "hard_weight": 0.3},
        ),
        (sparse, {"divergence": "reverse_kl", "temperature": 0.7, "hard_weight": 0.5}),
        (sparse | {"tail": "renormalize"}, {"divergence": "jsd", "reduction": "none"}),
    ]
    for teach, kw in cases:
        per_row = kw.get("reduction") == "none"
        ref_teach = {k: v.cpu() for k, v in teach.items() if torch.is_tensor(v)}
        ref_teach |= {k: v for k, v in teach.items() if not torch.is_tensor(v)}
        ref_loss, ref_grad = reference(
            logits, **ref_teach, **kw, target=target, upstream=up if per_row else None
        )
        if "teacher_logits" in teach:
            teach = dict(teach, teacher_logits=teacher[:, s].float().to(device))
        results = []
        for backend in (fusedce.get_backend(), "torch"):
            x = logits[:, s].float().to(device).requires_grad_(True)
            with fusedce.use_backend(backend):
                loss = fusedce.distillation_loss(
                    x, **teach, **kw, target=target.to(device), process_group=group
                )
                (loss * (up.float().to(device) if per_row else 1.0)).sum().backward()
            results.append((loss.double().cpu(), x.grad.cpu()))
        (loss, grad), (torch_loss, torch_grad) = results
        torch.testing.assert_close(loss, ref_loss, atol=3e-5, rtol=3e-5)
        assert rel_err(grad, ref_grad[:, s]) < 3e-5, (rank, kw)
        torch.testing.assert_close(loss, torch_loss, atol=1e-6, rtol=1e-6)
        assert rel_err(grad, torch_grad) < 1e-5, (rank, kw)
    # The first of each pair ran the slices' kernels wherever the rows run on Triton.
    if fusedce.uses_triton(torch.empty(0, device=device)):
        assert set(launches) == {"slice_stats", "slice_sums", "slice_grad"}, launches
    else:
        assert not launches, launches


def test_sharded_distillation_several_tiles(tmp_path) -> None:
    _spawn(2, tmp_path, timeout_s=240.0, worker=_worker_tiles)


@pytest.mark.gpu
def test_sharded_distillation_slices_on_the_gpu(tmp_path) -> None:
    """The slices' kernels compiled for the GPU: two processes on one GPU over gloo (which
    reduces CUDA tensors), against the float64 reference and the torch slices on the GPU."""
    _spawn(2, tmp_path, timeout_s=240.0, local="cuda", worker=_worker_tiles)
