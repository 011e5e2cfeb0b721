"""The large-vocabulary task with its output layer split over 2 CPU processes (gloo, Lightning's
ModelParallelStrategy, ``configs/large_vocab_tp.yaml``) trains along the same loss curve as the
unsharded run, z-loss, softcap, logit scale and l1 / l2 included; its logged statistics are those
of the full rows; each rank holds only its rows of the head; bad settings raise clear errors."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from fusedce.lightning_modules import Classifier
from fusedce.lightning_modules.vocab_parallel import chunk_bounds, shard_head

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # a hang fails the test instead of blocking the suite
VOCAB, HIDDEN, STEPS = 1001, 32, 24  # 1001 classes: 501 + 500 rows over 2 ranks
SMALL = [
    "--config", str(REPO / "configs" / "large_vocab.yaml"),
    "--run.cpu_overrides", "{}",
    "--data.init_args.vocab_size", str(VOCAB),
    "--data.init_args.in_features", "16",
    "--data.init_args.num_samples", "1000",
    "--data.init_args.batch_size", "32",
    "--data.init_args.num_workers", "0",
    "--data.init_args.pin_memory", "false",
    "--model.hidden_sizes", f"[{HIDDEN}]",
    "--model.optimizer.init_args.lr", "0.01",
    "--trainer.precision", "32-true",
    "--trainer.accelerator", "cpu",
    "--trainer.max_steps", str(STEPS),
    "--trainer.log_every_n_steps", "1",
    "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--run.wandb_mode", "disabled",
    "--trainer.callbacks+=test_vocab_parallel_train.RecordHead",
    # Every one-pass extra of the loss, and both penalties (the preset keeps z_loss 1e-4).
    "--model.logit_softcap", "4.0",
    "--model.loss_logit_scale", "1.5",
    "--model.l1", "1e-6",
    "--model.l2", "1e-5",
]  # fmt: skip
CURVES = (
    "train/loss_step",
    "train/z_loss_step",
    "train/grad_norm",
    "train/entropy_step",
    "train/acc_step",
)


class RecordHead(Callback):
    """Writes, per rank, what the head and the hidden layer hold at the start of training to
    ``$VP_RECORD_DIR/rank{r}.json``."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Records the local shapes of the head and of the first hidden Linear."""
        head = pl_module.head
        local = head.weight.to_local() if hasattr(head.weight, "to_local") else head.weight
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "head_is_dtensor": hasattr(head.weight, "to_local"),
            "head_local": list(local.shape),
            "bias_local": list(getattr(head.bias, "_local_tensor", head.bias).shape),
            "head_checksum": float(local.double().sum()),
            "hidden": list(pl_module.net.body[0].weight.shape),
        }
        out = Path(os.environ["VP_RECORD_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(record))


def _run_train(tmp_path: Path, name: str, extra: list[str]) -> Path:
    """Runs ``train.py fit`` on the small task; returns the run directory."""
    record = tmp_path / f"{name}-ranks"
    record.mkdir()
    env = dict(os.environ, VP_RECORD_DIR=str(record), WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "train.py", "fit", *SMALL, *extra]
    cmd += ["--run.root", str(tmp_path), "--run.name", name]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp_path / name


def _curve(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _records(tmp_path: Path, name: str) -> list[dict]:
    files = sorted((tmp_path / f"{name}-ranks").glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def test_sharded_head_follows_the_unsharded_loss_curve(tmp_path: Path) -> None:
    # The reference is the plain Classifier in one process. It runs under a distributed strategy
    # too (ddp, 1 process), because distributed strategies reseed after building the model and
    # the shuffle order then differs from a single-device run's.
    ref = _run_train(
        tmp_path,
        "unsharded",
        [
            "--trainer.strategy", "ddp",
            "--trainer.devices", "1",
            "--trainer.use_distributed_sampler", "false",
        ],
    )  # fmt: skip
    tp = _run_train(
        tmp_path,
        "sharded",
        ["--config", str(REPO / "configs" / "large_vocab_tp.yaml"), "--trainer.devices", "2"],
    )

    for key in CURVES:
        a, b = _curve(ref, key), _curve(tp, key)
        assert sorted(a) == sorted(b) == list(range(STEPS)), key
        steps = sorted(a)
        torch.testing.assert_close(
            torch.tensor([b[s] for s in steps]),
            torch.tensor([a[s] for s in steps]),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, key=key: f"{key}: {m}",
        )
    assert min(_curve(tp, "train/z_loss_step").values()) > 1e-4  # the z-loss is really on
    loss = _curve(tp, "train/loss_step")
    assert loss[STEPS - 1] < loss[0] - 0.1  # it trains, so the comparison is not vacuous

    (unsharded,) = _records(tmp_path, "unsharded")
    assert unsharded["head_local"] == [VOCAB, HIDDEN] and not unsharded["head_is_dtensor"]
    sharded = _records(tmp_path, "sharded")
    assert [r["rank"] for r in sharded] == [0, 1] and all(r["world"] == 2 for r in sharded)
    assert [r["head_local"] for r in sharded] == [[501, HIDDEN], [500, HIDDEN]]
    assert [r["bias_local"] for r in sharded] == [[501], [500]]
    assert all(r["head_is_dtensor"] for r in sharded)
    assert all(r["hidden"] == [HIDDEN, 16] for r in sharded)  # the hidden layer: replicated
    # Same seed, same full head on every rank: the two slices add up to the unsharded head.
    total = sum(r["head_checksum"] for r in sharded)
    assert total == pytest.approx(unsharded["head_checksum"], rel=1e-9, abs=1e-9)
    # The checkpoint holds the whole head (gathered), loadable without any process group.
    state = torch.load(tp / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["net.head.weight"].shape == (VOCAB, HIDDEN)


# ---------------------------------------------------------------------------- process helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _JOBS[job](rank, world)
    except Exception as exc:  # reported to the parent, which asserts on it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _job_too_many_ranks(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shard_head(nn.Linear(4, world - 1), mesh)
    return {"error": None}


EXTRAS = {"z_loss": 1e-3, "logit_softcap": 4.0, "loss_logit_scale": 1.5, "l1": 1e-4, "l2": 1e-3}


def _job_stats(rank: int, world: int) -> dict:
    """`Classifier`'s sharded loss, statistics and gradients against the unsharded model's with
    the same weights, for the fused and the unfused head, hard and soft targets, with and
    without the extras."""
    from torch.distributed.device_mesh import init_device_mesh

    vocab = 37
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
    start, width = chunk_bounds(vocab, world, rank)
    # (fused_head, soft targets, options): the unfused head is checked here only.
    cases = [
        (True, False, {}),
        (True, False, EXTRAS),
        (False, False, EXTRAS),
        (False, True, EXTRAS),
    ]
    for fused_head, soft, extras in cases:
        torch.manual_seed(0)
        kwargs = dict(in_features=8, num_classes=vocab, hidden_sizes=[16], **extras)
        ref = Classifier(fused_head=fused_head, **kwargs)
        x = torch.randn(64, 8)
        if soft:
            y = torch.softmax(3 * torch.randn(64, vocab), dim=-1)
        else:
            y = torch.randint(vocab, (64,))
            y[4] = -100
        if not extras:  # ties across ranks (class 5 on rank 0, 30 on rank 1): 5 wins
            with torch.no_grad():
                ref.head.weight[30] = ref.head.weight[5]
                ref.head.bias[5] = ref.head.bias[30] = 50.0
            y[:4] = 5
        model = Classifier(fused_head=fused_head, vocab_parallel=True, **kwargs)
        model.load_state_dict(ref.state_dict())
        model._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
        model.configure_model()

        loss, stats = model.batch_loss(x, y)
        (loss + model.regularization()).backward()
        ref_loss, ref_stats = ref.cross_entropy_with_stats(ref(x), y)
        (ref_loss + ref.regularization()).backward()

        case = f"fused_head={fused_head} soft={soft} extras={bool(extras)}"
        close = dict(rtol=1e-5, atol=1e-6, msg=lambda m, case=case: f"{case}: {m}")
        torch.testing.assert_close(loss, ref_loss, **close)
        torch.testing.assert_close(model.regularization(), ref.regularization(), **close)
        for name in ("z_loss", "lse", "entropy"):
            torch.testing.assert_close(getattr(stats, name), getattr(ref_stats, name), **close)
        assert torch.equal(stats.correct, ref_stats.correct), case
        assert stats.correct[:4].all() or extras, case
        # Each rank: its rows of the head's gradient; the replicated layer's whole gradient.
        for got, want in [
            (model.head.weight.grad.to_local(), ref.head.weight.grad[start : start + width]),
            (model.head.bias.grad.to_local(), ref.head.bias.grad[start : start + width]),
            (model.net.body[0].weight.grad, ref.net.body[0].weight.grad),
        ]:
            torch.testing.assert_close(got, want, **close)
    return {"error": None, "width": width, "cases": len(cases)}


def _job_both(rank: int, world: int) -> dict:
    """The sharded `Classifier` loss, then more ranks than classes, on one 2-process group."""
    result = _job_stats(rank, world)
    try:
        _job_too_many_ranks(rank, world)
        result["refused"] = None
    except Exception as exc:
        result["refused"] = f"{type(exc).__name__}: {exc}"
    return result


_JOBS = {"both": _job_both}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The results of `_job_both` on 2 real gloo processes (one spawn for both tests)."""
    out = tmp_path_factory.mktemp("two_ranks")
    world = 2
    ctx = mp.start_processes(
        _worker,
        args=(world, _free_port(), "both", str(out)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes hung (a rank waits in a collective)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_sharded_loss_stats_and_gradients_match_the_full_rows(two_ranks: list[dict]) -> None:
    assert [r["error"] for r in two_ranks] == [None, None]
    assert [r["width"] for r in two_ranks] == [19, 18]
    assert [r["cases"] for r in two_ranks] == [4, 4]


def test_more_ranks_than_classes_raise_on_every_rank(two_ranks: list[dict]) -> None:
    for r in two_ranks:
        assert r["refused"].startswith("ValueError: vocab_parallel: 2 tensor-parallel ranks for 1 ")


# ---------------------------------------------------------------------------- in-process checks
def test_chunk_bounds_follow_torch_chunk() -> None:
    for vocab, world in [(1001, 2), (1001, 3), (8, 4), (10, 4), (128256, 8)]:
        chunks = torch.arange(vocab).chunk(world)
        for rank, c in enumerate(chunks):
            assert chunk_bounds(vocab, world, rank) == (int(c[0]), len(c))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loss_impl": "torch"}, "loss_impl='torch'"),
        ({"inplace_backward": True}, "inplace_backward=True"),
        (
            {"loss_impl": "torch", "inplace_backward": True, "z_loss": 1e-4},
            "loss_impl='torch', inplace_backward=True",
        ),
    ],
)
def test_vocab_parallel_refuses_options_it_cannot_shard(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match="vocab_parallel=True takes") as info:
        Classifier(in_features=4, num_classes=10, vocab_parallel=True, **kwargs)
    assert str(info.value).endswith(f"set: {named}")


def test_vocab_parallel_takes_the_loss_extras_and_penalties() -> None:
    model = Classifier(in_features=4, num_classes=10, vocab_parallel=True, **EXTRAS)
    assert {k: model.hparams[k] for k in EXTRAS} == EXTRAS


def test_vocab_parallel_without_a_device_mesh_says_which_strategy() -> None:
    model = Classifier(in_features=4, num_classes=10, vocab_parallel=True)
    with pytest.raises(ValueError, match=r"needs trainer\.strategy .*ModelParallelStrategy"):
        model.configure_model()
    Classifier(in_features=4, num_classes=10).configure_model()  # off: nothing to do
