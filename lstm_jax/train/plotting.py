"""Training and evaluation curves of a run dir, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from lstm_jax.train.config import ConfigError
from lstm_jax.train.progress import read_metrics

__all__ = ["plot_run"]

# Bookkeeping fields of a metrics.jsonl event, not curves.
_NOT_CURVES = {"step", "split", "time", "chance", "steps_per_sec", "chars_per_sec"}


def plot_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Plot every metric of ``RUN_DIR/metrics.jsonl`` against the step, train and eval together,
    with the task's chance level dashed; write ``RUN_DIR/curves.png`` (or ``out``)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = read_metrics(workdir / "metrics.jsonl")
    if not records:
        raise ConfigError(f"{workdir}: no metrics.jsonl events to plot")
    chance = {}
    info = workdir / "task.json"
    if info.exists():
        chance = json.loads(info.read_text(encoding="utf-8")).get("chance", {})
    names: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in _NOT_CURVES and k not in names and isinstance(v, (int, float)):
                names.append(k)
    # The task's metrics first, then loss, then optimizer diagnostics.
    order = {k: i for i, k in enumerate(list(chance) + ["loss", "grad_norm", "lr"])}
    names.sort(key=lambda k: order.get(k, len(order)))
    # A curve identical to one already drawn (adding's objective "loss" is its "mse") is skipped.
    def same(k: str, j: str) -> bool:
        return all(r[k] == r.get(j) for r in records if k in r)

    names = [k for i, k in enumerate(names) if not any(same(k, j) for j in names[:i])]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.3 * len(names)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        if name in chance:
            ax.axhline(chance[name], color="gray", linestyle="--", label="chance")
        if name in ("loss", "mse", "grad_norm", "bpc") and all(
                r[name] > 0 for r in records if name in r):
            ax.set_yscale("log")
        if name == "lr":
            ax.set_ylim(bottom=0.0)
        ax.set_ylabel(name)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(workdir.name)
    fig.tight_layout()
    path = Path(out) if out is not None else workdir / "curves.png"
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out}: no directory {str(path.parent)!r} to write into")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
