"""Data-parallel and multi-host training on JAX's own runtime: a ``data`` mesh axis and
``jax.distributed``.

One program runs on every device (SPMD). The global batch (``train.batch_size`` rows) is split
row-wise over the ``data`` axis of a :class:`jax.sharding.Mesh`; parameters, optimizer state,
step and metric sums are replicated; the charlm carry ``LSTMState(h, c)`` with ``h: (L*D, B, H)``
is split along its batch axis like the batch that produces it. The jitted step is the
single-device step: XLA inserts the all-reduce of the gradients and of the batch means.

The batch of step ``s`` is made by a ``jax.jit`` whose output is sharded over ``data``, so each
device (and so each host) computes only its own rows; with JAX's partitionable threefry (the
default) these are the same numbers as the rows of the single-device batch. The training
trajectory therefore does not depend on the device or process count, up to the order of float32
sums, and a checkpoint written with one mesh resumes on another.

Several processes (one per host, or per GPU) join with :func:`initialize` from
``distributed.*`` before anything touches a device; then ``jax.devices()`` lists every process's
devices, the mesh spans them all, and every process runs the same loop. Only process 0 writes
files other than checkpoints (``config.yaml``, ``metrics.jsonl``, messages, the progress bar);
orbax writes and restores each checkpoint from all processes (the run dir must be on a
filesystem they share).

Example (8 local devices, batch 64: 8 rows per device)::

    dp = DataParallel(MeshConfig(data=0), batch_size=64)
    dp.mesh                     # Mesh('data': 8)
    dp.rows                     # NamedSharding(mesh, P('data'))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lstm_jax.train.config import Config, ConfigError, DistributedConfig, MeshConfig

__all__ = ["DATA", "DataParallel", "agree", "barrier", "fit_mesh_size", "initialize", "is_lead",
           "mesh_for_here", "record_config"]

DATA = "data"  # the mesh axis the batch is split over

_KERNELS = ("pallas", "cudnn", "cpu")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def initialize(cfg: DistributedConfig) -> bool:
    """Call ``jax.distributed.initialize`` if ``distributed.*`` asks for it; True if it did.

    Must run before the first computation (the trainer calls it first thing). On CPU the
    processes talk through gloo, so ``jax_cpu_collectives_implementation`` is set to it first.
    Unset keys (``num_processes`` 0, ``process_id`` -1, no address) are left to JAX, which reads
    them from the cluster environment (TPU pods, SLURM, Open MPI).
    """
    if not (cfg.initialize or cfg.coordinator_address):
        return False
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None and is_initialized():
        return False  # already joined (a notebook, a test calling the trainer twice)
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # the option is gone in a JAX that always has CPU collectives
        pass
    kwargs: dict[str, Any] = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"distributed: jax.distributed.initialize({_kw(kwargs)}) failed: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                          ) from None
    return True


def _kw(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def is_lead() -> bool:
    """True in the process that writes logs, messages and plots (process 0)."""
    return jax.process_index() == 0


def agree(values: list[int]) -> list[int]:
    """The elementwise maximum of ``values`` over all processes (each process's own values when
    there is one).

    The loop's host-side decisions (a signal arrived, the time limit passed) must be the same in
    every process, or one would leave the loop while the others wait for it in a collective.
    """
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
    return [int(v) for v in np.max(np.asarray(gathered).reshape(-1, len(values)), axis=0)]


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def record_config(cfg: Config) -> Config:
    """``cfg`` as a run dir records it: without ``distributed.*``, which describes one launch
    (a stale coordinator address would make a resume try to join it), not the run."""
    return dataclasses.replace(cfg, distributed=DistributedConfig())


# ----------------------------------------------------------------------------------------------
# The mesh and the shardings
# ----------------------------------------------------------------------------------------------

def mesh_for_here(cfg: Config) -> Config:
    """``cfg`` with a ``mesh.data`` this machine can run: its own if it fits, else the most
    devices that split the batch (for using a finished run, e.g. ``lstm-jax eval``, on whatever
    machine is at hand)."""
    try:
        DataParallel(cfg.mesh, cfg.train.batch_size)
    except ConfigError:
        return dataclasses.replace(cfg, mesh=MeshConfig(data=fit_mesh_size(cfg.train.batch_size)))
    return cfg


def fit_mesh_size(batch_size: int) -> int:
    """The most devices, up to all, that split ``batch_size`` rows evenly."""
    per_process = jax.local_device_count()
    procs = jax.process_count()
    for n in range(jax.device_count(), 0, -1):
        if batch_size % n == 0 and n % procs == 0 and n // procs <= per_process:
            return n
    return procs


class DataParallel:
    """The ``data`` mesh of a run and the shardings of its arrays.

    Args:
      cfg: ``mesh.*``; ``data`` devices (0: all). With several processes each contributes
        ``data / process_count`` of its local devices.
      batch_size: the global batch, which the mesh must split evenly.

    Raises:
      ConfigError: the mesh asks for more devices than there are, cannot be split evenly over
        the processes, or does not divide the batch.
    """

    def __init__(self, cfg: MeshConfig, batch_size: int):
        total, procs = jax.device_count(), jax.process_count()
        n = cfg.data or total
        if n > total:
            raise ConfigError(f"mesh.data: {n} devices asked for, but only {total} are visible "
                              f"({jax.default_backend()}); 0 uses all of them")
        if n % procs:
            raise ConfigError(f"mesh.data: {n} devices cannot be split evenly over "
                              f"{procs} processes; use a multiple of {procs}")
        if batch_size % n:
            what = "all devices" if not cfg.data else f"mesh.data={cfg.data}"
            divisors = [d for d in range(n, 0, -1) if batch_size % d == 0 and d % procs == 0]
            hint = f" or mesh.data={divisors[0]}" if divisors else ""
            raise ConfigError(
                f"train.batch_size: {batch_size} rows cannot be split evenly over the {n} "
                f"devices of the data mesh ({what}); use a multiple of {n} "
                f"(e.g. train.batch_size={-(-batch_size // n) * n}){hint}")
        if n == total:
            self.mesh = _make_mesh(n, None)
        else:
            # Each process gives the same number of its own devices, in process order.
            k = n // procs
            self.mesh = _make_mesh(n, [d for p in range(procs) for d in
                                       [d for d in jax.devices() if d.process_index == p][:k]])
        self.size = n
        self.batch_size = batch_size
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(DATA))  # split along the first axis

    def __repr__(self) -> str:
        return (f"DataParallel({self.size} devices over {jax.process_count()} process(es), "
                f"{self.batch_size // self.size} rows each)")

    def describe(self) -> str:
        """One line for the run's start-up messages."""
        procs = jax.process_count()
        where = f" in {procs} processes" if procs > 1 else ""
        kind = jax.devices()[0].device_kind if self.size else "?"
        return (f"data parallel: {self.size} {kind} device(s){where}, "
                f"{self.batch_size // self.size} of {self.batch_size} rows each")

    # -- shardings of pytrees --------------------------------------------------------------------

    def batch_sharding(self, batch: Any) -> Any:
        """Rows split over ``data`` for every array with a batch axis; scalars replicated."""
        return jax.tree.map(lambda a: self.rows if np.ndim(a) else self.replicated, batch)

    def carry_sharding(self, carry: Any) -> Any:
        """``LSTMState`` leaves ``(L*D, B, H)``: split along B, their second axis."""
        split = NamedSharding(self.mesh, P(None, DATA))
        return jax.tree.map(lambda a: split if np.ndim(a) == 3 else self.replicated, carry)

    def state_sharding(self, state: Any) -> Any:
        """A TrainState's shardings: everything replicated but the carried LSTM state."""
        out = jax.tree.map(lambda _: self.replicated, state)
        return out._replace(carry=self.carry_sharding(state.carry))

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host values (the same in every process) as global arrays with ``shardings``; each
        process transfers only the shards of its own devices."""
        def one(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(one, tree, shardings)

    # -- the model under the mesh ----------------------------------------------------------------

    def model_config(self, cfg: Any) -> Any:
        """``model.*`` for this mesh: with more than one device the core runs its ``lax.scan``
        backend, which XLA partitions over the batch; the Pallas, cuDNN and C++ CPU kernels are
        custom calls that XLA would run on the whole batch on every device."""
        if self.size == 1:
            return cfg
        backend = cfg.lstm_kwargs.get("backend", "auto")
        if backend in _KERNELS:
            raise ConfigError(
                f"model.lstm_kwargs.backend: {backend!r} cannot be split over the "
                f"{self.size}-device data mesh (XLA does not partition custom kernels); use "
                f"backend auto or scan, or mesh.data=1")
        if backend == "auto":
            cfg = dataclasses.replace(cfg, lstm_kwargs={**cfg.lstm_kwargs, "backend": "scan"})
        return cfg


def _make_mesh(n: int, devices: list | None) -> Mesh:
    """A one-axis ``data`` mesh of ``n`` devices with automatic (compiler-chosen) sharding of
    the values inside the jitted functions."""
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        # jax.make_mesh orders the devices for fast collectives (a ring on TPU).
        return jax.make_mesh((n,), (DATA,), axis_types=auto)
    return Mesh(np.asarray(devices), (DATA,), axis_types=auto)
