"""The training loop: Optax optimizer, one jitted step over a TrainState, evaluation, resume.

Read top to bottom: optimizer, state, step functions, evaluation, then :func:`train_and_evaluate`.

Determinism: the training batch of step ``s`` is ``task.train_batch(s)`` and the dropout key is
``fold_in(dropout_key, s)``; everything else that changes lives in the TrainState, which a
checkpoint stores whole. So a run resumed from step ``s`` continues exactly as if it had never
stopped (same machine, same numbers).
"""

from __future__ import annotations

import difflib
import inspect
import json
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from lstm_jax.train import distributed as dist
from lstm_jax.train.checkpoint import Checkpointer
from lstm_jax.train.config import (
    CONFIG_HEADER,
    Config,
    ConfigError,
    OptimConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    read_yaml,
)
from lstm_jax.train.model import Model, make_model
from lstm_jax.train.progress import MetricsLog, ProgressBar
from lstm_jax.train.tasks import Task, make_task

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "Trainer", "make_optimizer",
           "train_and_evaluate"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving."""


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------

def _optax_optimizers() -> list[str]:
    names = []
    for name in dir(optax):
        fn = getattr(optax, name)
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        try:
            if "learning_rate" in inspect.signature(fn).parameters:
                names.append(name)
        except (TypeError, ValueError):
            pass
    return names


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """``constant``: linear warmup over ``warmup_steps`` (if any), then ``lr``.
    ``warmup_cosine``: linear warmup to ``lr``, cosine decay to ``lr * final_lr_fraction`` at
    ``decay_steps`` (default ``total_steps``)."""
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.decay_steps or total_steps, end_value=cfg.lr * cfg.final_lr_fraction)
    if cfg.warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
             optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def _matrices(params: Any) -> Any:
    """Weight-decay mask: matrices (and embeddings) decay, biases and gains do not."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``getattr(optax, cfg.name)(learning_rate=schedule, **cfg.kwargs)``, with clipping by global
    norm first and weight decay on matrices (the optimizer's own ``weight_decay`` if it has one,
    as adamw; else an L2 term added to the gradient)."""
    fn = getattr(optax, cfg.name, None)
    valid = _optax_optimizers()
    if cfg.name not in valid or fn is None:
        match = difflib.get_close_matches(cfg.name, valid, n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"optim.name: {cfg.name!r} is not an optax optimizer{hint}")
    sig = inspect.signature(fn).parameters
    kwargs = dict(cfg.kwargs)
    for k in kwargs:
        if k not in sig or k == "learning_rate":
            match = difflib.get_close_matches(k, [p for p in sig if p != "learning_rate"], n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"optim.kwargs.{k}: not an argument of optax.{cfg.name}{hint}")
    if "weight_decay" in kwargs:
        raise ConfigError("optim.kwargs.weight_decay: use optim.weight_decay")
    schedule = make_schedule(cfg, total_steps)
    decay_inside = "weight_decay" in sig
    if decay_inside:
        kwargs["weight_decay"] = cfg.weight_decay
        if "mask" in sig and "mask" not in kwargs:
            kwargs["mask"] = _matrices
    try:
        opt = fn(learning_rate=schedule, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim: optax.{cfg.name} rejected its arguments: {e}") from None
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.weight_decay > 0 and not decay_inside:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_matrices))
    parts.append(opt)
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------------------

class TrainState(NamedTuple):
    """Everything that changes during training; a checkpoint stores it whole.

    Attributes:
      step: ``()`` int32, optimizer steps taken.
      params: the model's parameters (see :func:`lstm_jax.train.model.make_model`).
      opt_state: the optax state.
      carry: the LSTM state carried between batches (``LSTMState``, charlm) or ``()``.
      metric_sums: running sums of the train metrics since the last log event.
      metric_count: ``()`` int32, steps summed in ``metric_sums``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    carry: Any
    metric_sums: dict[str, jax.Array]
    metric_count: jax.Array


class Trainer:
    """The pieces of a run built from one config: task, model, optimizer and jitted functions.

    ``train_step(state, batch) -> (state, metrics)`` is one ``jax.jit`` with the state donated.
    It computes the loss and gradient, applies the optimizer, and, if the loss or the gradient
    norm is not finite, returns the input state unchanged with ``metrics["finite"] = False`` (so
    the caller always holds a good state). ``make_batch(step) -> batch`` is jitted apart from it,
    its rows split over the ``data`` mesh axis of ``self.dp`` (see :mod:`.distributed`); the
    state is replicated but for the carried LSTM state, split along its batch axis.
    """

    def __init__(self, cfg: Config, task: Task | None = None):
        self.cfg = cfg
        self.dp = dist.DataParallel(cfg.mesh, cfg.train.batch_size)
        self.task = task if task is not None else make_task(cfg)
        self.model: Model = make_model(self.dp.model_config(cfg.model), self.task)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps)
        root = jax.random.PRNGKey(cfg.seed)
        self._init_key = jax.random.fold_in(root, 0)
        self._dropout_key = jax.random.fold_in(root, 505)
        self.batch_size = cfg.train.batch_size
        self.metric_names = ("loss",) + tuple(m for m in self.task.metrics if m != "loss") + (
            "grad_norm",)
        # Every jitted function names its output shardings, so a state made by init_state, by a
        # step or by a restore is laid out the same way and no step compiles twice.
        abstract = jax.eval_shape(self._init_impl)
        self.state_sharding = self.dp.state_sharding(abstract)
        self._abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.state_sharding)
        carry_sharding = self.dp.carry_sharding(abstract.carry)
        replicated = self.dp.replicated
        batch = jax.eval_shape(lambda step: self.task.train_batch(step, self.batch_size),
                               jax.ShapeDtypeStruct((), jnp.int32))
        self.batch_sharding = self.dp.batch_sharding(batch)
        self.abstract_batch = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), batch,
            self.batch_sharding)
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  out_shardings=(self.state_sharding, replicated))
        self.make_batch = jax.jit(lambda step: self.task.train_batch(step, self.batch_size),
                                  out_shardings=self.batch_sharding)
        self._eval_step = jax.jit(self._eval_step_impl,
                                  out_shardings=(carry_sharding, replicated, replicated))
        self._reset_sums = jax.jit(self._reset_sums_impl, donate_argnums=0,
                                   out_shardings=self.state_sharding)
        self._init = jax.jit(self._init_impl, out_shardings=self.state_sharding)
        self._zero_carry = jax.jit(
            lambda: self.model.zero_state(self.batch_size) if self.task.stateful else (),
            out_shardings=carry_sharding)
        self._eval_data: list[dict[str, Any]] | None = None

    # -- state -----------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """Step 0: fresh parameters from the seed, optimizer state, zero carry and sums."""
        return self._init()

    def _init_impl(self) -> TrainState:
        params = self.model.init(self._init_key)
        carry = self.model.zero_state(self.batch_size) if self.task.stateful else ()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), carry=carry,
                          metric_sums={k: jnp.zeros((), jnp.float32) for k in self.metric_names},
                          metric_count=jnp.zeros((), jnp.int32))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without computing it (for restoring)."""
        return self._abstract

    # -- step ------------------------------------------------------------------------------------

    def _forward(self, params, carry, batch, key):
        """``(objective, (metrics, new carry))`` for one batch."""
        if self.task.stateful:
            # A new epoch of the stream starts from a zero state.
            carry = jax.tree.map(lambda z: jnp.where(batch["reset"], jnp.zeros_like(z), z),
                                 carry)
            initial = carry
        else:
            initial = None
        out, state = self.model.apply(params, batch["x"], initial,
                                      seq_lengths=batch.get("lengths"), key=key)
        loss, metrics = self.task.loss(out, batch)
        new_carry = jax.lax.stop_gradient(state) if self.task.stateful else ()
        return loss, (metrics, new_carry)

    def _train_step(self, state: TrainState, batch: dict[str, Any]
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(self._dropout_key, state.step)
        grad_fn = jax.value_and_grad(self._forward, has_aux=True)
        (loss, (metrics, carry)), grads = grad_fn(state.params, state.carry, batch, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        new = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, carry=carry,
            metric_sums={k: state.metric_sums[k] + metrics[k] for k in self.metric_names},
            metric_count=state.metric_count + 1)
        # Keep the last good state rather than poison it; the host stops on finite == False.
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics["finite"] = finite
        return new, metrics

    def _reset_sums_impl(self, state: TrainState) -> TrainState:
        return state._replace(metric_sums=jax.tree.map(jnp.zeros_like, state.metric_sums),
                              metric_count=jnp.zeros_like(state.metric_count))

    def pop_train_metrics(self, state: TrainState) -> tuple[TrainState, dict[str, float]]:
        """Mean train metrics since the last call, and the state with the sums zeroed."""
        sums, count = jax.device_get((state.metric_sums, state.metric_count))
        means = {k: float(v) / max(int(count), 1) for k, v in sums.items()}
        return self._reset_sums(state), means

    # -- evaluation ------------------------------------------------------------------------------

    def _eval_step_impl(self, params, carry, batch):
        loss, (metrics, carry) = self._forward(params, carry, batch, None)
        return carry, {"loss": loss, **metrics}, jnp.sum(batch["weight"])

    def evaluate(self, params: Any) -> dict[str, float]:
        """The task's metrics on its whole evaluation set (weighted means over examples)."""
        if self._eval_data is None:
            self._eval_data = [self.dp.put(b, self.dp.batch_sharding(b))
                               for b in self.task.eval_batches(self.batch_size)]
        carry = self._zero_carry()
        outs = []
        for batch in self._eval_data:
            carry, metrics, w = self._eval_step(params, carry, batch)
            outs.append((metrics, w))
        # Summed on the host: replicated values read locally, with no collective outside a jit
        # (eager arithmetic on arrays spanning processes is not something every process joins).
        outs = jax.device_get(outs)
        weight = sum(float(w) for _, w in outs)
        return {k: sum(float(m[k]) * float(w) for m, w in outs) / weight
                for k in self.task.metrics}


_TRAINERS: OrderedDict[str, Trainer] = OrderedDict()


def get_trainer(cfg: Config) -> Trainer:
    """A Trainer for ``cfg``, reused while the config and its data file are unchanged.

    Runs of one config in one process (a resumed run in a notebook, tests) then share compiled
    functions instead of compiling them again.
    """
    data = Path(cfg.data.path) if cfg.data.path else None
    stamp = data.stat().st_mtime_ns if data is not None and data.exists() else None
    # Only what the compiled functions depend on: not the loop's cadence, nor train.steps
    # unless the learning-rate schedule reads it.
    plain = config_to_dict(cfg)
    ignored = RESUMABLE_KEYS - ({"steps"} if cfg.optim.schedule != "constant" else set())
    plain["train"] = {k: v for k, v in plain["train"].items() if k not in ignored}
    key = json.dumps([plain, stamp], sort_keys=True, default=str)
    if key in _TRAINERS:
        _TRAINERS.move_to_end(key)
        return _TRAINERS[key]
    trainer = _TRAINERS[key] = Trainer(cfg)
    while len(_TRAINERS) > 4:
        _TRAINERS.popitem(last=False)
    return trainer


def build_trainer(cfg: Config) -> Trainer:
    """:func:`get_trainer`, and one abstract trace of the training step.

    Values the schema cannot judge alone (``model.lstm_kwargs``, ``optim.kwargs``, a variant's
    rate) are checked by ``lstm_jax`` and optax when the model is built and first traced; their
    ``ValueError``/``TypeError`` comes back as a :class:`ConfigError` here, before a run dir
    is made. The trace is cached: the first real step does not trace again.
    """
    try:
        trainer = get_trainer(cfg)
        jax.eval_shape(trainer.train_step, trainer.abstract_state(), trainer.abstract_batch)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model/optim: the core library rejected this config: {first}") from None
    return trainer


def _has_checkpoints(workdir: Path) -> bool:
    """Whether ``workdir/checkpoints`` holds a step directory (without creating it)."""
    return any((workdir / "checkpoints").glob("[0-9]*"))


def check_workdir(workdir: str | Path) -> None:
    """Refuse a run dir that would lose or misread what is already in it.

    A new run writes ``config.yaml``, ``task.json``, ``metrics.jsonl`` and ``checkpoints/``;
    a directory that holds some of these without being a run dir of ours keeps them.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: exists and is not a directory")
    if not workdir.is_dir():
        return
    config = workdir / "config.yaml"
    ours = config.is_file() and config.read_text(encoding="utf-8", errors="replace").startswith(
        CONFIG_HEADER)
    has_checkpoints = _has_checkpoints(workdir)
    if has_checkpoints and not config.is_file():
        raise ConfigError(f"--workdir {workdir}: has checkpoints but no config.yaml, so they "
                          f"cannot be matched to a config; restore {config} or use a new run dir")
    if ours or has_checkpoints:
        return  # a run of ours: resume it
    found = [n for n in ("config.yaml", "task.json", "metrics.jsonl") if (workdir / n).exists()]
    if found:
        raise ConfigError(f"--workdir {workdir}: holds {', '.join(found)} not written by "
                          f"lstm-jax, which a new run would overwrite; choose another run dir "
                          f"(a config file of yours belongs outside it)")


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

class TrainResult(NamedTuple):
    """How a call to :func:`train_and_evaluate` ended.

    status: ``"done"`` (reached ``train.steps``), ``"time_limit"``, or ``"interrupted"`` (a signal
    or ``stop_at``; a checkpoint was saved); signal: the signal number when interrupted by one.
    """

    status: str
    step: int
    metrics: dict[str, float]
    workdir: str
    signal: int | None = None


# Keys of a saved run's config that may change when it is resumed; anything else would change the
# state's structure or the data, so it needs a new run dir.
RESUMABLE_KEYS = {"steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "time_limit", "progress"}


def check_resume_compatible(saved: dict[str, Any], cfg: Config) -> None:
    """Raise ConfigError if ``cfg`` differs from a run's saved config beyond ``train.*`` cadence."""
    new = config_to_dict(cfg)
    for section, values in new.items():
        if section in ("mesh", "distributed"):
            continue  # how the run is spread over devices, not what it computes
        old_values = saved.get(section)
        if not isinstance(values, dict):
            if old_values != values:
                raise ConfigError(f"{section}: this run dir was started with {old_values!r}, not "
                                  f"{values!r}; use a new --workdir")
            continue
        for k, v in values.items():
            if section == "train" and k in RESUMABLE_KEYS:
                continue
            old = (old_values or {}).get(k)
            if section == "optim" and k == "decay_steps" and not old and (
                    v == (saved.get("train") or {}).get("steps")):
                continue  # the same cosine, now spelled out: train.steps may then grow alone
            if old != v:
                raise ConfigError(f"{section}.{k}: this run dir was started with {old!r}, not "
                                  f"{v!r}; only train.{{{', '.join(sorted(RESUMABLE_KEYS))}}} may "
                                  f"change on resume (use a new --workdir)")


def read_run_config(workdir: str | Path) -> Config:
    """The resolved config saved in a run dir."""
    path = Path(workdir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{workdir}: not a run dir (no config.yaml)")
    return config_from_dict(read_yaml(path))


class _SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop polls after each step (a second SIGINT
    interrupts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _fmt(metrics: dict[str, float], chance: dict[str, float]) -> str:
    parts = []
    for k, v in metrics.items():
        c = f" (chance {chance[k]:.4g})" if k in chance else ""
        parts.append(f"{k} {v:.4f}{c}")
    return ", ".join(parts)


def _count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def train_and_evaluate(cfg: Config, workdir: str | Path, *, stop_at: int | None = None,
                       quiet: bool = False) -> TrainResult:
    """Train ``cfg`` in ``workdir`` (resuming its newest checkpoint), evaluating as configured.

    Writes ``config.yaml``, ``task.json``, ``metrics.jsonl`` and ``checkpoints/<step>/`` into
    ``workdir``. Stops at ``train.steps``; or after ``train.time_limit`` minutes (checkpoint, then
    evaluate); or on SIGINT/SIGTERM, or at step ``stop_at`` (checkpoint only; this is how tests
    interrupt a run). Raises :class:`NonFiniteLossError` if the loss stops being finite (nothing
    is saved then, so the last good checkpoint stays the newest) and :class:`ConfigError` if the
    run dir holds a run with an incompatible config.
    """
    dist.initialize(cfg.distributed)  # before anything touches a device
    workdir = Path(workdir)
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        return _train(cfg, workdir, ckpt, stop_at, quiet)
    finally:
        ckpt.close()


def _train(cfg: Config, workdir: Path, ckpt: Checkpointer, stop_at: int | None,
           quiet: bool) -> TrainResult:
    lead = dist.is_lead()  # process 0 writes the files and messages; all run the same steps

    def say(text: str) -> None:
        if not quiet and lead:
            bar.message(text)

    latest = ckpt.latest_step()
    notes = []
    if latest is not None and (workdir / "config.yaml").exists():
        saved = yaml.safe_load((workdir / "config.yaml").read_text(encoding="utf-8"))
        check_resume_compatible(saved, cfg)
        old_steps = (saved.get("train") or {}).get("steps")
        if (cfg.optim.schedule == "warmup_cosine" and not cfg.optim.decay_steps
                and old_steps is not None and old_steps != cfg.train.steps):
            notes.append(f"note: optim.decay_steps=0 ties the cosine to train.steps, which went "
                         f"{old_steps} -> {cfg.train.steps}: the learning rate follows the new "
                         f"curve from step {latest} on (optim.decay_steps={old_steps} would keep "
                         f"the old one)")

    trainer = get_trainer(cfg)
    task = trainer.task
    log: MetricsLog | _NoLog = _NoLog()
    if lead:
        dump_config(dist.record_config(cfg), workdir / "config.yaml")
        (workdir / "task.json").write_text(json.dumps(task.info(), indent=1), encoding="utf-8")
        log = MetricsLog(workdir / "metrics.jsonl")

    elapsed_before = 0.0
    if latest is not None:
        state, meta = ckpt.restore(latest, trainer.abstract_state())
        elapsed_before = float(meta.get("elapsed", 0.0))
        log.truncate_after(latest)
    else:
        state = trainer.init_state()
        log.truncate_after(0)
    step = int(state.step)
    total = cfg.train.steps

    bar = ProgressBar(total, step, enabled=cfg.train.progress and not quiet and lead,
                      every=cfg.train.log_every)
    say(f"task {task.name}: {', '.join(task.metrics)}; chance "
        f"{_fmt(task.chance, {})} ({task.chance_note})")
    say(f"model: {_count_params(state.params):,} parameters; optimizer {cfg.optim.name}, "
        f"lr {cfg.optim.lr:g} ({cfg.optim.schedule})")
    if trainer.dp.size > 1 or jax.process_count() > 1:
        say(trainer.dp.describe())
    if latest is not None:
        say(f"resuming from step {latest} ({ckpt.directory}/{latest})")
    for note in notes:
        say(note)
    start_step = step
    if step >= total:
        say(f"already at step {step} >= train.steps={total}; raise train.steps to continue")

    t_start = time.perf_counter()
    t_log, step_log = t_start, step
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    chars_per_step = (trainer.batch_size * task.seq_len if task.name == "charlm" else None)
    time_limit = cfg.train.time_limit * 60.0

    def meta() -> dict[str, Any]:
        m = {"step": step, "elapsed": elapsed_before + time.perf_counter() - t_start,
             "seed": cfg.seed, "devices": trainer.dp.size, "processes": jax.process_count()}
        if hasattr(task, "position"):
            m["data_position"] = task.position(step)
        return m

    def now() -> float:
        return round(elapsed_before + time.perf_counter() - t_start, 3)

    def run_eval() -> dict[str, float]:
        nonlocal last_eval, last_eval_step
        last_eval = trainer.evaluate(state.params)
        last_eval_step = step
        log.write({"step": step, "split": "eval", **last_eval,
                   "chance": {k: task.chance[k] for k in last_eval if k in task.chance},
                   "time": now()})
        say(f"eval step {step}: {_fmt(last_eval, task.chance)}")
        return last_eval

    status, signum = "done", None
    try:
        with _SignalCatcher() as signals:
            while step < total:
                batch = trainer.make_batch(np.int32(step))
                state, metrics = trainer.train_step(state, batch)
                ok, loss = jax.device_get((metrics["finite"], metrics["loss"]))
                if not ok:
                    bar.close()
                    good = ckpt.latest_step()
                    where = (f"the last good checkpoint is step {good} in {ckpt.directory}"
                             if good is not None else "no checkpoint was saved yet")
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss)}) at step {step + 1}: training stopped; "
                        f"{where}. Try a lower optim.lr or optim.clip_norm=1.0.")
                step += 1
                bar.update(step, float(loss))
                if step % cfg.train.log_every == 0 or step == total:
                    state, means = trainer.pop_train_metrics(state)
                    t = time.perf_counter()
                    rec = {"step": step, "split": "train", **means,
                           "lr": float(trainer.schedule(step - 1)), "time": now(),
                           "steps_per_sec": round((step - step_log) / max(t - t_log, 1e-9), 3)}
                    if chars_per_step:
                        rec["chars_per_sec"] = round(rec["steps_per_sec"] * chars_per_step, 1)
                    log.write(rec)
                    t_log, step_log = t, step
                if step % cfg.train.eval_every == 0 or step == total:
                    run_eval()
                # The checkpoint comes after this step's log events, so a checkpoint at step s
                # implies the log is complete up to s.
                if step % cfg.train.checkpoint_every == 0 or step == total:
                    ckpt.save(step, state, meta())
                # Decided together: a process leaving alone would hang the others' next step.
                sig, stop, out_of_time = dist.agree([
                    signals.signum or 0, int(stop_at is not None and step >= stop_at),
                    int(bool(time_limit) and time.perf_counter() - t_start >= time_limit)])
                if sig:
                    status, signum = "interrupted", sig
                    break
                if stop:
                    status = "interrupted"
                    break
                if out_of_time:
                    status = "time_limit"
                    break
        bar.close()
        resume = f"lstm-jax train --workdir {workdir}"
        if step == start_step and status == "done":
            # Nothing trained (already finished): report, but write nothing new.
            last_eval = trainer.evaluate(state.params)
            say(f"eval step {step}: {_fmt(last_eval, task.chance)} (not logged again)")
            return TrainResult(status, step, last_eval, str(workdir), signum)
        ckpt.save(step, state, meta())
        if status == "interrupted":
            why = signal.Signals(signum).name if signum else "stop_at"
            say(f"interrupted ({why}) at step {step}; checkpoint saved in {ckpt.directory}. "
                f"To resume: {resume}")
        else:
            if last_eval_step != step:
                run_eval()
            if status == "time_limit":
                say(f"stopped by the time limit ({cfg.train.time_limit:g} min) at step "
                    f"{step}/{total}, {format_time(now())} of training; checkpoint saved. "
                    f"To continue: {resume}")
            else:
                say(f"done: step {step}, {format_time(now())} of training; eval "
                    f"{_fmt(last_eval, task.chance)}")
    finally:
        bar.close()
    return TrainResult(status, step, last_eval, str(workdir), signum)


class _NoLog:
    """metrics.jsonl in the processes other than 0: nothing is written."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


def format_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------
# Using a finished (or running) run
# ----------------------------------------------------------------------------------------------

def restore_run(workdir: str | Path, step: int | None = None
                ) -> tuple[Config, Trainer, TrainState, int]:
    """Config, trainer and state of a run dir's newest checkpoint (or of ``step``), on as many
    of this machine's devices as split the run's batch."""
    cfg = dist.mesh_for_here(read_run_config(workdir))
    if step is None and not _has_checkpoints(Path(workdir)):
        raise ConfigError(f"{workdir}: no checkpoint yet")
    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir}: no checkpoint yet")
        trainer = get_trainer(cfg)
        state, _ = ckpt.restore(step, trainer.abstract_state())
    finally:
        ckpt.close()
    return cfg, trainer, state, step


def evaluate_run(workdir: str | Path) -> tuple[int, dict[str, float], dict[str, float]]:
    """``(step, metrics, chance)`` of a run dir's newest checkpoint on the evaluation set."""
    _, trainer, state, step = restore_run(workdir)
    return step, trainer.evaluate(state.params), trainer.task.chance

