"""Checkpoints with orbax-checkpoint: async, atomic, keep-last-k, corruption-tolerant restore.

A checkpoint `<workdir>/checkpoints/<step>/` holds the `TrainState` pytree
('state', restored with the shardings of a template state) and a JSON
'meta' item (step, data-iterator state, anything else the trainer wants).
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed while saving leaves no half-written step behind.
If the newest checkpoint cannot be read (damaged files), `restore_latest`
reports it, moves it aside to `<workdir>/checkpoints_corrupt/` (nothing is
deleted) and falls back to the previous one.

Integrity (see docs/reliability.md):
- The meta records every state leaf as `[path, shape, dtype, checksum]`. The
  checksum (`checksums`, one jitted pass on device) is two uint32 folds of the
  leaf's bit patterns: the wrapping sum of its words and the wrapping sum of
  word * (2 * index + 1); any change of a single word changes both, so a
  flipped bit, a swapped value or finite garbage is caught on restore
  (`CorruptCheckpointError`, treated like an unreadable checkpoint).
- `save` refuses a state with NaN/Inf in any float leaf (`NonFiniteStateError`),
  writing nothing.
- A checkpoint whose leaves (paths, shapes, dtypes) differ from the template
  raises `IncompatibleCheckpointError` naming the first differing leaf; it is
  not damaged, so it is neither moved nor skipped.

Faults of the directory are refused when the `Checkpointer` is made, not
found by a background write later: an unwritable directory, and a step folder
that is a symbolic link (orbax deletes old steps with `rmtree`, which refuses
links, so the run would crash at its first clean-up).

Async writes: at most one is in flight. `save` first waits for the previous
write (orbax's `CheckpointManager.save` would too), so the last completed
write is never more than one save behind; `save` returns how far behind it
was and how long it waited (`SaveInfo`), and logs it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint problem the user must act on (bad directory, another model)."""


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint's leaves (paths, shapes or dtypes) differ from the template's."""


class CorruptCheckpointError(CheckpointError):
  """The checkpoint's data do not match the checksums saved with it."""


class NonFiniteStateError(FloatingPointError):
  """`save` was handed a state with NaN/Inf; nothing was written."""


def _words(x: jax.Array) -> jax.Array:
  """The bit patterns of `x` as uint32[x.shape] (8-byte items folded into one word)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  if size == 8:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return w[..., 0] * jnp.uint32(0x9E3779B1) + w[..., 1]
  raise TypeError(f"checksum: unsupported dtype {x.dtype}.")


def _leaf_check(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(uint32[2] checksum, bool[] all finite) of one leaf, computed where `x` lives."""
  w = _words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):  # the flat index, without reshaping a sharded array
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  total = jnp.sum(w, dtype=jnp.uint32)
  weighted = jnp.sum(w * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  finite = jnp.asarray(True)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    finite = jnp.all(jnp.isfinite(x))
  return jnp.stack([total, weighted]), finite


@jax.jit
def _inspect(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(uint32[n, 2] checksums, bool[n] finite) of n leaves, in one program."""
  if not leaves:
    return jnp.zeros((0, 2), jnp.uint32), jnp.zeros((0,), jnp.bool_)
  sums, finite = zip(*[_leaf_check(x) for x in leaves])
  return jnp.stack(sums), jnp.stack(finite)


def inspect(state: PyTree) -> list[dict[str, Any]]:
  """One record per leaf of `state`: {'path', 'shape', 'dtype', 'checksum', 'finite'}.

  `checksum` is a 16-hex-digit string (two uint32 folds of the leaf's bit
  patterns, computed on device by one jitted function; only 9 bytes per leaf
  come to the host). Works on sharded and multi-host arrays.
  """
  flat = jax.tree_util.tree_leaves_with_path(state)
  arrays = [jnp.asarray(x) for _, x in flat]
  groups: dict[Any, list[int]] = {}  # one program per set of devices the leaves live on
  for i, x in enumerate(arrays):
    groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
  sums, finite = [None] * len(arrays), [None] * len(arrays)
  for idx in groups.values():
    g_sums, g_finite = jax.device_get(_inspect([arrays[i] for i in idx]))
    for j, i in enumerate(idx):
      sums[i], finite[i] = g_sums[j], g_finite[j]
  return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
           "dtype": _dtype(x),
           "checksum": f"{int(s[0]):08x}{int(s[1]):08x}", "finite": bool(f)}
          for (p, x), s, f in zip(flat, sums, finite)]


def _dtype(x: Any) -> str:
  return str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _warn(msg: str) -> None:
  log.warning(msg)
  print("WARNING: " + msg, file=sys.stderr, flush=True)


class SaveInfo(NamedTuple):
  """What `Checkpointer.save` found when it started writing `step`.

  last_completed: the newest step whose write had finished (None: none yet).
  steps_behind: `step - last_completed` (None: no completed write yet).
  waited_for: the step whose write was still in flight and had to finish
    first (None: the previous write was already done), and waited_s: for how long.
  """
  step: int
  last_completed: Optional[int]
  steps_behind: Optional[int]
  waited_for: Optional[int]
  waited_s: float


def describe(info: SaveInfo) -> str:
  """One log line: the step being written and how far behind the last completed write is."""
  text = f"checkpoint step {info.step}: writing in the background; last completed write: "
  text += ("none yet" if info.last_completed is None else
           f"step {info.last_completed} ({info.steps_behind} steps behind)")
  if info.waited_for is not None:
    text += f"; waited {info.waited_s:.1f} s for the write of step {info.waited_for} first"
  return text


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`.

  Args:
    directory: the checkpoint root (e.g. `<workdir>/checkpoints`); it must be
      writable and hold no symlinked step folder (both checked now:
      CheckpointError otherwise).
    keep: how many of the newest checkpoints to keep.
    async_save: write in a background thread (call `wait()` before exiting).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    self.directory = os.path.abspath(directory)
    self.corrupt_dir = os.path.join(os.path.dirname(self.directory),
                                    os.path.basename(self.directory) + "_corrupt")
    _check_writable(self.directory)
    _check_no_symlinked_steps(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._writing: Optional[int] = None  # The step of the write in flight (or last started).
    self.last_completed: Optional[int] = self.steps()[-1] if self.steps() else None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> Optional[SaveInfo]:
    """Starts saving `state` (any pytree of arrays) and the JSON-able `meta` at `step`.

    The meta gets a 'leaves' entry: [path, shape, dtype, checksum] per leaf.
    Raises NonFiniteStateError (writing nothing) if a float leaf holds NaN/Inf.
    A write still in flight is waited for first (at most one is pending).
    Returns a `SaveInfo` (None when `step` is already saved).
    """
    if step in self.manager.all_steps():
      return None
    leaves = inspect(state)
    bad = [r["path"] for r in leaves if not r["finite"]]
    if bad:
      done = self.steps()
      last = (f"the last checkpoint, step {done[-1]}, is intact" if done
              else "there is no earlier checkpoint")
      raise NonFiniteStateError(
          f"refusing to save checkpoint step {step}: non-finite values (NaN/Inf) in "
          f"{len(bad)} leaves, first {bad[:3]}; nothing was written ({last}).")
    meta = {**meta, "leaves": [[r["path"], r["shape"], r["dtype"], r["checksum"]]
                               for r in leaves]}
    in_flight = self._writing if self.manager.is_saving_in_progress() else None
    t0 = time.time()
    self.manager.wait_until_finished()  # The bound: never two writes in flight.
    waited = time.time() - t0
    if self._writing is not None:
      self.last_completed = self._writing
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._writing = step
    behind = None if self.last_completed is None else step - self.last_completed
    info = SaveInfo(step, self.last_completed, behind, in_flight, waited)
    log.info(describe(info))
    return info

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON meta of checkpoint `step` (CorruptCheckpointError if unreadable)."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CorruptCheckpointError(
          f"checkpoint step {step}: meta unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
      raise CorruptCheckpointError(f"checkpoint step {step}: meta is not a JSON object.")
    return meta

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` into the structure, dtypes and shardings of `template`.

    Raises IncompatibleCheckpointError when the saved leaves differ from the
    template's (another model: nothing is damaged), CorruptCheckpointError
    when the data fail their checksums, the meta names another step or a leaf
    is non-finite, and orbax's own errors for unreadable files.
    """
    meta = self.read_meta(step)
    saved = meta.get("leaves")
    if saved is not None:
      _check_compatible(step, saved, template)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # orbax/tensorstore raise many types for damaged files.
      raise CorruptCheckpointError(
          f"checkpoint step {step}: state unreadable ({type(e).__name__}: {e})") from e
    if int(meta.get("step", step)) != step:
      raise CorruptCheckpointError(
          f"checkpoint step {step} has meta for step {meta.get('step')}")
    got = inspect(state)
    if saved is None:
      _warn(f"checkpoint step {step} in {self.directory} has no checksums (written by an "
            "older mixjax): restored without verifying its data.")
    else:
      for (path, _, _, want), r in zip(saved, got):
        if r["checksum"] != want:
          raise CorruptCheckpointError(
              f"checkpoint step {step}: leaf {path} fails its checksum (saved {want}, read "
              f"{r['checksum']}): its files are damaged.")
    bad = [r["path"] for r in got if not r["finite"]]
    if bad:
      raise CorruptCheckpointError(
          f"checkpoint step {step} holds non-finite values in {bad[:3]}")
    return state, {k: v for k, v in meta.items() if k != "leaves"}

  def restore_latest(self, template: PyTree) -> Optional[tuple[PyTree, dict[str, Any]]]:
    """The newest readable checkpoint, or None if there is none.

    Unreadable or damaged checkpoints are reported (a warning on stderr naming
    the failing leaf or file) and moved to `<directory>_corrupt/<step>-<time>`
    by process 0. A checkpoint of another model (IncompatibleCheckpointError)
    is raised: it is left in place, and nothing older is tried.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, template)
      except CorruptCheckpointError as e:
        msg = (f"Checkpoint {os.path.join(self.directory, str(step))} is unreadable "
               f"({type(e).__name__}: {str(e)[:300]}); moving it to {self.corrupt_dir} and "
               "trying the previous one.")
        _warn(msg)
        print("WARNING: " + msg, flush=True)  # stdout too: the training log.
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


def _check_writable(directory: str) -> None:
  """Raises CheckpointError unless `directory` can be created and a file created in it.

  The probe is one `os.open(O_CREAT | O_EXCL)` of a uniquely named file, then removed.
  """
  probe = os.path.join(directory, f".mixjax_write_test_{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"checkpoint directory {directory} is not writable ({type(e).__name__}: {e}); fix "
        "its permissions or pass another --workdir.") from None


def _check_no_symlinked_steps(directory: str) -> None:
  """Raises CheckpointError if a step folder (a name of digits) in `directory` is a symlink.

  orbax's clean-up of old steps calls `rmtree` on them, which refuses links: the
  run would stop with an OSError at its first clean-up, after training.
  """
  links = sorted((n for n in os.listdir(directory)
                  if n.isdigit() and os.path.islink(os.path.join(directory, n))), key=int)
  if links:
    shown = ", ".join(f"{n} -> {os.readlink(os.path.join(directory, n))}" for n in links[:3])
    raise CheckpointError(
        f"checkpoint directory {directory} holds symlinked step folders ({shown}): orbax "
        "deletes old steps with rmtree, which refuses symbolic links, so the run would stop at "
        "its first clean-up. Replace each link by a copy of its target (cp -rL) or move it "
        "out of the directory, then run again.")


def _check_compatible(step: int, saved: list, template: PyTree) -> None:
  """Raises IncompatibleCheckpointError at the first leaf where `saved` and `template` differ."""
  want = [(jax.tree_util.keystr(p), list(np.shape(x)), _dtype(x))
          for p, x in jax.tree_util.tree_leaves_with_path(template)]
  for i in range(max(len(saved), len(want))):
    s = tuple(saved[i][:3]) if i < len(saved) else None
    w = want[i] if i < len(want) else None
    if s is None or w is None or s[0] != w[0]:
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} is of another model: leaf #{i} is "
          f"{s[0] if s else 'missing'} in the checkpoint but {w[0] if w else 'missing'} in "
          "this run's state; use another --workdir (or the config that wrote it).")
    if list(s[1]) != list(w[1]) or s[2] != w[2]:
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} is of another model: leaf {w[0]} has shape "
          f"{tuple(s[1])} {s[2]} in the checkpoint but {tuple(w[1])} {w[2]} in this run's "
          "state; use another --workdir (or the config that wrote it).")
