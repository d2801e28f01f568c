"""Checkpoints in ``RUN_DIR/checkpoints/<step>/`` with orbax-checkpoint.

Each checkpoint holds two items: ``state`` (the whole TrainState pytree: step, parameters,
optimizer state, carried LSTM state, running metric sums) and ``meta`` (JSON: step, the data
stream's position, elapsed training time). Orbax writes a step into a temporary directory and
renames it only once complete, so a SIGKILL at any moment leaves the previous checkpoints valid and
the partial one invisible. Saves are synchronous: when :meth:`Checkpointer.save` returns, the step
is on disk.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Self

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


_TMP_MARK = ".orbax-checkpoint-tmp"


def _remove_partial_saves(directory: str) -> None:
    """Delete the temporary directories of saves that never finished (a killed process).

    Orbax writes ``<step>.orbax-checkpoint-tmp...`` and renames it to ``<step>`` when complete, so
    these are never valid checkpoints. With several processes only process 0 does this, and the
    others wait for it (see :class:`Checkpointer`).
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TMP_MARK in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` keeping the last ``keep`` steps."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(directory)
        if jax.process_index() == 0:
            _remove_partial_saves(self.directory)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lstm_jax: checkpoint dir cleaned")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Synchronous: the loop's next step donates the state's buffers, and a run that exits
            # right after saving must find the step on disk.
            enable_async_checkpointing=False,
            # Leftovers of a killed save are removed by _remove_partial_saves instead: orbax's
            # own cleanup runs in a background thread that can race with itself.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write ``state`` and ``meta`` as step ``step`` (a no-op if that step exists)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Read step ``step`` into the structure, shapes, dtypes and shardings of ``like``.

        The shardings may differ from the saved ones (a checkpoint written on 8 devices restores
        on 1 and vice versa): each process reads the parts of each array its devices hold.
        """
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
            if hasattr(a, "shape") else a, like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
