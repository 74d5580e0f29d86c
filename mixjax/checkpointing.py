"""Checkpoints with orbax-checkpoint: async, atomic, keep-last-k, corruption-tolerant restore.

A checkpoint `<workdir>/checkpoints/<step>/` holds the `TrainState` pytree
('state', restored with the shardings of a template state) and a JSON
'meta' item (step, data-iterator state, anything else the trainer wants).
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed while saving leaves no half-written step behind.
If the newest checkpoint cannot be read (damaged files), `restore_latest`
reports it, moves it aside to `<workdir>/checkpoints_corrupt/` (nothing is
deleted) and falls back to the previous one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


def _finite(x: Any) -> bool:
  """True unless a float leaf has NaN/Inf in this process's shards."""
  if not np.issubdtype(np.dtype(x.dtype), np.floating) and x.dtype != jax.numpy.bfloat16:
    return True
  shards = x.addressable_shards if isinstance(x, jax.Array) else [None]
  datas = [np.asarray(s.data, np.float32) if s is not None else np.asarray(x, np.float32)
           for s in shards]
  return all(bool(np.all(np.isfinite(d))) for d in datas)


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`.

  Args:
    directory: the checkpoint root (e.g. `<workdir>/checkpoints`).
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread (call `wait()` before exiting).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    self.directory = os.path.abspath(directory)
    self.corrupt_dir = os.path.join(os.path.dirname(self.directory),
                                    os.path.basename(self.directory) + "_corrupt")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts saving `state` (any pytree of arrays) and the JSON-able `meta` at `step`."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` into the structure, dtypes and shardings of `template`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, meta = out.state, out.meta
    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
           if not _finite(x)]
    if bad:
      raise ValueError(f"checkpoint step {step} holds non-finite values in {bad[:3]}")
    if int(meta.get("step", step)) != step:
      raise ValueError(f"checkpoint step {step} has meta for step {meta.get('step')}")
    return state, meta

  def restore_latest(self, template: PyTree) -> Optional[tuple[PyTree, dict[str, Any]]]:
    """The newest readable checkpoint, or None if there is none.

    Unreadable checkpoints are reported (warning) and moved to
    `<directory>_corrupt/<step>-<time>` by process 0.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, template)
      except Exception as e:  # orbax/tensorstore raise many types for damaged files.
        msg = (f"Checkpoint {os.path.join(self.directory, str(step))} is unreadable "
               f"({type(e).__name__}: {str(e)[:300]}); moving it to {self.corrupt_dir} and "
               "trying the previous one.")
        log.warning(msg)
        print("WARNING: " + msg, flush=True)
        self._move_aside(step)
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_dir, exist_ok=True)
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mixjax_move_aside_{step}")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
