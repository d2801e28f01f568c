"""The training configuration: one typed schema, YAML files and dotted overrides on top of it.

The dataclasses below are the single source of truth for every key: its default, its type and
its allowed range. A YAML file overrides some of them, then ``section.key=value`` strings from the
command line override those. Anything that does not fit the schema (an unknown key, a wrong type,
a value out of range, an unreadable file) raises :class:`ConfigError` with one message naming
the key, before any work starts; the command line turns it into exit status 2.

Example::

    cfg = load_config("configs/charlm.yaml", ["model.hidden_size=256", "optim.lr=3e-3"])
    cfg.model.hidden_size  # 256
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_HEADER",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
]

TASKS = ("adding", "copy", "charlm", "classify")


class ConfigError(ValueError):
    """A configuration that cannot be used. The message names the offending key."""


def _f(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, choices: tuple | None = None,
       doc: str = "", core: bool = False) -> Any:
    """A schema field: a default plus the checks `_check_range` applies.

    ``core=True`` marks a model field that is forwarded, under its own name, to whichever of
    ``lstm_jax.init_lstm`` / ``lstm_jax.lstm`` accepts it (see ``model.core_kwargs``).
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc, "core": core}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

@dataclass
class TaskConfig:
    """Which task to learn and its shape. Keys a task does not use are ignored by it."""

    name: str = _f("adding", choices=TASKS, doc="adding | copy | charlm | classify")
    seq_len: int = _f(100, ge=2, doc="adding: sequence length; charlm: truncated-BPTT window")
    delay: int = _f(20, ge=1, doc="copy: blank steps between the symbols and the recall marker")
    copy_length: int = _f(10, ge=1, doc="copy: how many symbols to remember")
    num_symbols: int = _f(8, ge=2, doc="copy: alphabet size")
    eval_size: int = _f(2048, ge=1, doc="adding/copy: examples in the fixed test set")


@dataclass
class DataConfig:
    """Files on disk (charlm: a UTF-8 text; classify: an .npz)."""

    path: str = _f("", doc="relative paths are tried against the cwd, the config's dir, the repo")
    val_fraction: float = _f(0.1, gt=0.0, lt=1.0, doc="charlm: tail of the text held out")


@dataclass
class ModelConfig:
    """Embedding or input projection -> the core LSTM -> a linear readout.

    Fields marked ``core`` go straight to ``lstm_jax.init_lstm`` / ``lstm_jax.lstm`` by name (routed
    by their signatures), and so does every entry of ``lstm_kwargs``: a new core option is reachable
    at once as ``model.lstm_kwargs.NAME=...`` and becomes a typed field here with one line.
    """

    hidden_size: int = _f(128, ge=1, doc="LSTM units per direction")
    num_layers: int = _f(1, ge=1, core=True)
    bidirectional: bool = _f(False, core=True)
    proj_size: int = _f(0, ge=0, core=True, doc="0: no projection of h")
    bias: bool = _f(True, core=True)
    forget_bias: float = _f(1.0, core=True)
    init: str = _f("default", choices=("default", "pytorch"), core=True)
    dropout: float = _f(0.0, ge=0.0, lt=1.0, core=True, doc="between stacked LSTM layers")
    peephole: bool = _f(False, core=True, doc="Gers & Schmidhuber 2000")
    layer_norm: bool = _f(False, core=True, doc="Ba et al. 2016")
    cifg: bool = _f(False, core=True, doc="coupled input and forget gates")
    zoneout_h: float = _f(0.0, ge=0.0, lt=1.0, core=True, doc="Krueger et al. 2017")
    zoneout_c: float = _f(0.0, ge=0.0, lt=1.0, core=True)
    recurrent_dropout: float = _f(0.0, ge=0.0, lt=1.0, core=True, doc="Gal & Ghahramani 2016")
    candidate_dropout: float = _f(0.0, ge=0.0, lt=1.0, core=True, doc="Semeniuta et al. 2016")
    unroll: int = _f(0, ge=0, doc="time steps unrolled per scan iteration; 0: core default")
    embed_dim: int = _f(0, ge=0, doc="tokens: embedding size (0: one-hot); "
                                     "features: input projection size (0: none)")
    embed_dropout: float = _f(0.0, ge=0.0, lt=1.0, doc="on the LSTM's input")
    output_dropout: float = _f(0.0, ge=0.0, lt=1.0, doc="on the LSTM's output, before the readout")
    lstm_kwargs: dict = _f({}, doc="other keywords of init_lstm/lstm")  # noqa: RUF009

    def core_kwargs(self) -> dict[str, Any]:
        """The keyword arguments meant for the core, by name (``unroll`` 0 means not given)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.metadata.get("core")}
        if self.unroll:
            kw["unroll"] = self.unroll
        kw.update(self.lstm_kwargs)
        return kw


@dataclass
class OptimConfig:
    """``getattr(optax, name)(learning_rate=schedule, **kwargs)``, clipped and decayed."""

    name: str = _f("adam", doc="any optax optimizer taking learning_rate: adam, adamw, sgd, ...")
    lr: float = _f(3e-3, gt=0.0, doc="peak learning rate")
    schedule: str = _f("constant", choices=("constant", "warmup_cosine"))
    warmup_steps: int = _f(0, ge=0, doc="warmup_cosine: linear warmup from 0")
    final_lr_fraction: float = _f(0.0, ge=0.0, le=1.0, doc="warmup_cosine: end lr = lr * this")
    decay_steps: int = _f(0, ge=0, doc="warmup_cosine: length of the cosine; 0: train.steps "
                                       "(longer: the run ends part-way down the curve)")
    clip_norm: float = _f(1.0, ge=0.0, doc="clip gradients to this global norm; 0: off")
    weight_decay: float = _f(0.0, ge=0.0, doc="decoupled for optimizers that take it (adamw), "
                                              "else L2 added to the gradient; matrices only")
    kwargs: dict = _f({}, doc="extra keyword arguments of the optax optimizer")  # noqa: RUF009


@dataclass
class TrainConfig:
    """Loop length, batch, logging, evaluation and checkpoint cadence."""

    steps: int = _f(1500, ge=1, doc="total optimizer steps (raise it to continue a finished run)")
    batch_size: int = _f(32, ge=1)
    log_every: int = _f(50, ge=1, doc="train metrics to metrics.jsonl, averaged over the interval")
    eval_every: int = _f(250, ge=1)
    checkpoint_every: int = _f(500, ge=1)
    keep_checkpoints: int = _f(3, ge=1)
    time_limit: float = _f(0.0, ge=0.0, doc="minutes of training in this process; then "
                                            "checkpoint, evaluate and stop; 0: none")
    progress: bool = _f(True, doc="progress bar on stderr")


@dataclass
class MeshConfig:
    """Data parallelism: the global ``train.batch_size`` is split over a ``data`` axis of devices.

    Parameters and optimizer state are replicated; the numbers do not depend on the device count
    (up to the order of float32 sums). See ``lstm_jax.train.distributed``.
    """

    data: int = _f(0, ge=0, doc="devices on the data axis; 0: all devices of all processes")


@dataclass
class DistributedConfig:
    """Several processes (hosts) forming one JAX runtime with ``jax.distributed.initialize``.

    Nothing here is set by default: one process, no initialization. A ``coordinator_address``
    (or ``initialize: true``) joins the processes; keys left unset are read by JAX from the
    environment (TPU pods, SLURM, Open MPI). Not part of a run's identity: a run may resume
    with another process count.
    """

    initialize: bool = _f(False, doc="call jax.distributed.initialize() even without an "
                                     "address (the cluster environment supplies it)")
    coordinator_address: str = _f("", doc="host:port of process 0, e.g. 10.0.0.1:1234")
    num_processes: int = _f(0, ge=0, doc="0: from the environment")
    process_id: int = _f(-1, ge=-1, doc="this process's index; -1: from the environment")


@dataclass
class Config:
    """A whole training run. ``seed`` fixes the initialization, the data order and dropout."""

    seed: int = _f(0, ge=0)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------------------------
# Typed conversion
# ----------------------------------------------------------------------------------------------

def step_activation_bytes(cfg: Config) -> int | None:
    """Bytes of float32 activations one training step saves for its backward pass (an estimate).

    Per layer and direction the cell saves its gate activations, the previous cell state and
    its outputs: ``B * T * (4H + H + H_out) * 4`` bytes, ``B`` the global batch. ``T`` is the
    task's sequence length, or about ``2 sqrt(T)`` steps with ``model.lstm_kwargs.remat``
    (the states kept plus one chunk recomputed); None where it is only known from the data
    (``classify``). XLA's temporaries for the step are about twice this.

    Example::

        step_activation_bytes(load_config("configs/charlm.yaml"))  # 64*100*3072*4 = 78,643,200
    """
    m, t = cfg.model, cfg.task
    steps = {"adding": t.seq_len, "charlm": t.seq_len,
             "copy": t.delay + 2 * t.copy_length}.get(t.name)
    if steps is None:
        return None
    if m.lstm_kwargs.get("remat"):
        steps = min(steps, 2 * math.isqrt(steps - 1) + 2)
    out = m.proj_size or m.hidden_size
    per_row = 5 * m.hidden_size + out
    directions = 2 if m.bidirectional else 1
    return cfg.train.batch_size * steps * per_row * 4 * m.num_layers * directions


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` to schema type ``tp`` or raise ConfigError naming ``path``."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r} ({_type_name(value)})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float == int(as_float):
                return int(as_float)  # 1e4 and "2e3" are fine; 1.5 is not
        raise ConfigError(f"{path}: expected an integer, got {value!r} ({_type_name(value)})")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r} ({_type_name(value)})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r} ({_type_name(value)})")
    if tp is dict:
        if value is None:
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"{path}: expected a mapping of names to values, got {value!r}")
    raise TypeError(f"schema type {tp!r} of {path} is not supported")  # a bug in the schema


def _check_range(path: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(meta['choices'])}"
                          f"{_did_you_mean(str(value), meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value!r}")
        for op, bound, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):
            b = meta.get(op)
            if b is not None and not ok(value, b):
                raise ConfigError(f"{path}: must be {bound} {b}, got {value!r}")


def _section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        what = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{what}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'"
                              f"{_did_you_mean(str(key), fields)}; valid keys here: "
                              f"{', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _section_from_dict(tp, value, f"{path}.")
        else:
            kwargs[key] = _coerce(path, tp, value)
            _check_range(path, kwargs[key], fields[key].metadata)
    obj = cls(**kwargs)
    # Defaults are checked too: a schema default out of its own range is a bug worth catching.
    return obj


def config_from_dict(data: Any) -> Config:
    """Build a :class:`Config` from nested plain data (e.g. parsed YAML), checking every key."""
    cfg = _section_from_dict(Config, data, "")
    _check_cross(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain data (the inverse of :func:`config_from_dict`)."""
    return dataclasses.asdict(cfg)


def _check_cross(cfg: Config) -> None:
    """Checks that involve more than one key."""
    if cfg.task.name == "charlm" and cfg.model.bidirectional:
        raise ConfigError("model.bidirectional: a character language model cannot read the "
                          "future; set it to false for task.name=charlm")
    if cfg.task.name in ("charlm", "classify") and not cfg.data.path:
        raise ConfigError(f"data.path: task.name={cfg.task.name} needs a data file")
    if cfg.model.proj_size and cfg.model.proj_size >= cfg.model.hidden_size:
        raise ConfigError(f"model.proj_size: must be < model.hidden_size "
                          f"({cfg.model.hidden_size}), got {cfg.model.proj_size}")
    horizon = cfg.optim.decay_steps or cfg.train.steps
    if cfg.optim.schedule == "warmup_cosine" and cfg.optim.warmup_steps >= horizon:
        raise ConfigError(f"optim.warmup_steps: must be < the cosine's length ({horizon}), "
                          f"got {cfg.optim.warmup_steps}")
    dist = cfg.distributed
    if (dist.num_processes or dist.process_id >= 0) and not (dist.coordinator_address
                                                             or dist.initialize):
        key = "num_processes" if dist.num_processes else "process_id"
        raise ConfigError(f"distributed.{key}: set distributed.coordinator_address (or "
                          f"distributed.initialize=true) to start a multi-process run")
    if dist.num_processes and dist.process_id >= dist.num_processes:
        raise ConfigError(f"distributed.process_id: must be < distributed.num_processes "
                          f"({dist.num_processes}), got {dist.process_id}")


# ----------------------------------------------------------------------------------------------
# Overrides and files
# ----------------------------------------------------------------------------------------------

def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to nested plain data; values are parsed as YAML scalars.

    Typing happens afterwards in :func:`config_from_dict`, so ``model.hidden_size=256`` becomes the
    int 256 and ``model.hidden_size=big`` is an error naming ``model.hidden_size``.
    """
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.hidden_size=256")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text, the schema decides whether a string is fine
        _check_override_path(parts)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _check_override_path(parts: list[str]) -> None:
    """Reject an unknown dotted key early, with a suggestion built from the full dotted names."""
    cls: Any = Config
    for i, p in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # inside a free-form dict (lstm_kwargs, optim.kwargs): anything goes here
        hints = typing.get_type_hints(cls)
        if p not in hints:
            here = ".".join(parts[: i + 1])
            names = [".".join(parts[:i] + [n]) for n in hints]
            raise ConfigError(f"unknown key '{here}'{_did_you_mean(here, names)}")
        cls = hints[p]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"'{'.'.join(parts)}' is a section; set one of its keys, "
                          f"e.g. {'.'.join(parts)}.{dataclasses.fields(cls)[0].name}=...")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML config file into plain data; unreadable or malformed files are ConfigErrors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return data


def resolve_data_path(path: str, config_dir: str | os.PathLike | None) -> str:
    """Find ``data.path``: absolute as is; else relative to the cwd, the config's dir, the repo."""
    if not path:
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        bases = [Path.cwd()]
        if config_dir is not None:
            bases.append(Path(config_dir))
        bases.append(Path(__file__).resolve().parents[2])  # a source checkout's root
        candidates = [b / p for b in bases]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    tried = ", ".join(dict.fromkeys(str(c.resolve()) for c in candidates))
    raise ConfigError(f"data.path: no file {path!r} (looked at {tried})")


def load_config(path: str | os.PathLike | None = None,
                overrides: typing.Sequence[str] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Schema defaults <- ``base`` (plain data) <- YAML file ``path`` <- dotted ``overrides``.

    ``data.path`` comes back resolved to an absolute path (see :func:`resolve_data_path`).
    """
    data = _deep_copy(base) if base else {}
    config_dir = None
    if path is not None:
        data = _merge(data, read_yaml(path))
        config_dir = Path(path).resolve().parent
    data = apply_overrides(data, overrides)
    cfg = config_from_dict(data)
    try:
        cfg.data.path = resolve_data_path(cfg.data.path, config_dir)
    except ConfigError as e:
        if cfg.task.name != "classify":
            raise
        raise ConfigError(f"{e}; the demo set is written by: python -m lstm_jax.train.make_data "
                          f"{cfg.data.path}") from None
    return cfg


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("lstm_kwargs",
                                                                              "kwargs"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _deep_copy(v)
    return out


# The first line of a run dir's config.yaml: how a run dir tells its own record from a file a
# user put there (which a run must not overwrite).
CONFIG_HEADER = "# lstm-jax: the resolved config of this run"


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    text = (f"{CONFIG_HEADER} (all keys; edit the config you started from, "
            f"not this record)\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
