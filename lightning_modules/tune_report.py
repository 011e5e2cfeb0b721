"""What ``train.py tune`` leaves behind: ``study.json``, ``best.yaml``, ``study.png``, a W&B run
of the study, and the summary it prints."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from .search_space import param_flags
from .tools import command_line


def _write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (several tune processes may write it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _finite(value: Any) -> Any:
    return value if value is None or math.isfinite(value) else str(value)


def trial_rows(runner: Any) -> list[dict[str, Any]]:
    """Every trial of the study as a JSON-able dict.

    Keys: ``number``, ``state`` (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``),
    ``params`` (by flag name, as the flags take them), ``value``, ``pruned_at_epoch``,
    ``run_dir``, ``reason`` (failed trials), ``retry_of`` (a trial run again), ``seconds``,
    ``reports`` (the metric by epoch), ``command`` (the ``fit`` command).
    """
    by_key = {p.key: p for p in runner.setup.params}
    trials = runner.study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    rows = []
    for t in trials:
        attrs = t.user_attrs
        reason = attrs.get("reason")
        if t.state.name == "FAIL" and reason is None and t.number in retried:
            reason = "lost: its tune process stopped sending heartbeats"
        params = {k: (by_key[k].decode(v) if k in by_key else v) for k, v in t.params.items()}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": params,
                "value": _finite(t.value) if t.state.name == "COMPLETE" else None,
                "pruned_at_epoch": attrs.get("pruned_at_epoch"),
                "run_dir": attrs.get("run_dir"),
                "reason": reason,
                "retry_of": attrs.get("retry_of"),
                "seconds": attrs.get("seconds"),
                "reports": {str(k): _finite(v) for k, v in sorted(t.intermediate_values.items())},
                "command": attrs.get("command"),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    """The completed trial with the best value (the lowest number among equals)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r["value"], float | int)]
    if not done:
        return None
    sign = 1 if direction == "maximize" else -1
    return max(done, key=lambda r: (sign * r["value"], -r["number"]))


def write_best_yaml(best: dict[str, Any], study_dir: Path, metric: str) -> Path | None:
    """``best.yaml``: the best trial's ``config.yaml`` with its run name and root removed
    (``train.py fit --config best.yaml`` makes a new run directory)."""
    source = Path(best["run_dir"] or "") / "config.yaml"
    if not source.is_file():
        return None
    config = yaml.safe_load(source.read_text())
    run = config.get("run")
    if isinstance(run, dict):
        run["name"] = None
        run["root"] = None
    header = (
        f"# The best trial ({best['number']}, {metric} = {best['value']:.6g}) of this study.\n"
        f"# python train.py fit --config {study_dir / 'best.yaml'}\n"
    )
    path = study_dir / "best.yaml"
    _write(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def study_figure(runner: Any, rows: list[dict[str, Any]], path: Path) -> Path:
    """``study.png``: the optimisation history (values by trial, best so far, pruned and
    failed trials marked) and the parameter importances (optuna's PED-ANOVA)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = runner.setup
    sign = 1 if s.direction == "maximize" else -1
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    complete = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r["value"], float)]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["reports"]]
    failed = [r for r in rows if r["state"] == "FAIL"]
    ax.plot(
        [r["number"] for r in complete],
        [r["value"] for r in complete],
        "o",
        color="tab:blue",
        label="complete",
    )
    if pruned:
        last = [list(r["reports"].values())[-1] for r in pruned]
        ax.plot(
            [r["number"] for r in pruned],
            [v if isinstance(v, float) else math.nan for v in last],
            "x",
            color="tab:gray",
            label="pruned (last report)",
        )
    best, xs, ys = None, [], []
    for r in sorted(complete, key=lambda r: r["number"]):
        if best is None or sign * r["value"] > sign * best:
            best = r["value"]
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    for r in failed:
        ax.axvline(r["number"], color="tab:red", alpha=0.15, lw=4)
    if failed:
        ax.plot([], [], color="tab:red", alpha=0.3, lw=4, label="failed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=s.opts.metric, title=f"study {s.study_name}: history")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)

    importances = _importances(runner)
    if importances:
        names = list(importances)[::-1]
        bx.barh(names, [importances[n] for n in names], color="tab:blue")
        bx.set(xlabel="importance (PED-ANOVA)", title="parameter importances")
        bx.tick_params(axis="y", labelsize=8)
    else:
        bx.text(0.5, 0.5, "importances need more\ncompleted trials", ha="center", va="center")
        bx.set(title="parameter importances", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _importances(runner: Any) -> dict[str, float]:
    import warnings

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(
                runner.study, evaluator=PedAnovaImportanceEvaluator()
            )
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def log_study_to_wandb(runner: Any, rows: list[dict[str, Any]], best: Any, png: Path) -> str | None:
    """A W&B run of the study (group = the study, job type ``study``): the figure, a table of
    the trials and the best trial in its summary. Returns its directory (None: W&B off)."""
    s = runner.setup
    if s.wandb["mode"] in (None, "disabled"):  # no W&B, or a logger of the user's own
        return None
    import wandb

    run = wandb.init(
        project=s.wandb["project"],
        entity=s.wandb["entity"],
        group=s.study_name,
        job_type="study",
        name=s.study_name,
        dir=str(s.study_dir),
        mode=s.wandb["mode"],
        settings=wandb.Settings(silent=True),
        config={
            "tune": {
                "study": s.study_name,
                "metric": s.opts.metric,
                "direction": s.direction,
                "space": {p.key: p.spec() for p in s.params},
                "fit_args": s.fit_args,
            }
        },
    )
    try:
        columns = ["number", "state", "value", "pruned_at_epoch", "params", "reason"]
        table = wandb.Table(columns=columns)
        for r in rows:
            table.add_data(
                r["number"],
                r["state"],
                r["value"],
                r["pruned_at_epoch"],
                json.dumps(r["params"]),
                r["reason"],
            )
        run.log({"study": wandb.Image(str(png)), "trials": table})
        if best is not None:
            run.summary["best/value"] = best["value"]
            run.summary["best/trial"] = best["number"]
            run.summary["best/params"] = best["params"]
        return str(Path(run.dir).parent)
    finally:
        run.finish(exit_code=0 if runner.interrupted is None else 1)


def finish_study(runner: Any) -> int:
    """Writes ``study.json``, ``best.yaml``, ``study.png``, logs the study to W&B and prints
    the summary. Returns the number of completed trials."""
    s = runner.setup
    rows = trial_rows(runner)
    best = best_row(rows, s.direction)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    study_dir = s.study_dir
    best_yaml = write_best_yaml(best, study_dir, s.opts.metric) if best else None
    best_out = None
    if best is not None:
        best_out = {**best, "best_yaml": str(best_yaml) if best_yaml else None}
    summary = {
        "study": s.study_name,
        "metric": s.opts.metric,
        "direction": s.direction,
        "storage": s.storage_url,
        "trials_wanted": runner.total,
        "counts": counts,
        "fit_args": s.fit_args,
        "space": {p.key: p.spec() for p in s.params},
        "best": best_out,
        "trials": rows,
    }
    _write(study_dir / "study.json", json.dumps(summary, indent=2))
    png = study_figure(runner, rows, study_dir / "study.png")
    wandb_dir = log_study_to_wandb(runner, rows, best, png)
    print(summary_text(runner, rows, best, best_yaml, wandb_dir), flush=True)
    return counts.get("COMPLETE", 0)


def summary_text(
    runner: Any,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    best_yaml: Path | None,
    wandb_dir: str | None,
) -> str:
    """The lines that ``tune`` ends with."""
    s = runner.setup
    retried = {r["retry_of"] for r in rows}
    states = [
        "STOPPED" if r["state"] == "FAIL" and r["number"] in retried else r["state"] for r in rows
    ]
    parts = [
        f"{states.count(k)} {w}"
        for k, w in (
            ("COMPLETE", "complete"),
            ("PRUNED", "pruned"),
            ("FAIL", "failed"),
            ("STOPPED", "stopped and run again"),
            ("RUNNING", "running"),
            ("WAITING", "queued"),
        )
        if states.count(k)
    ]
    head = f"Study {s.study_name}"
    if runner.interrupted:
        head += f" (interrupted by {runner.interrupted}: the summary so far)"
    lines = [
        f"{head}: {len(rows)} trial{'' if len(rows) == 1 else 's'} "
        f"({', '.join(parts) or 'none'}), {runner.total} wanted; {s.direction} {s.opts.metric}"
    ]
    if best is None:
        lines.append("  best:        none (no trial completed)")
    else:
        flags = param_flags(s.params, best["params"])
        lines += [
            f"  best:        trial {best['number']}, {s.opts.metric} = {best['value']:.4f}",
            f"  params:      {shlex.join(flags)}",
            f"  run dir:     {best['run_dir']}",
            f"  reproduce:   {command_line(s.fit_command(best['params']))}",
        ]
        if best_yaml is not None:
            lines.append(f"               or: python train.py fit --config {best_yaml}")
    lines.append(f"  study dir:   {s.study_dir}  (study.json, best.yaml, study.png)")
    lines.append(f"  storage:     {s.storage_url}  (run the same command again to resume)")
    if wandb_dir is not None:
        lines.append(f"  W&B:         group {s.study_name}; the study's run: {wandb_dir}")
        if s.wandb["mode"] == "offline":
            runs = f"{s.study_dir}/wandb/offline-run-* {s.study_dir}/trial-*/wandb/offline-run-*"
            lines.append(f"               upload later with: wandb sync {runs}")
    return "\n".join(lines)
