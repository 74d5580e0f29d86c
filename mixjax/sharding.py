"""Device meshes and shardings for the train step: data parallelism, optionally with FSDP.

The mesh has two axes, `('data', 'fsdp')`. The global batch is split over both
(`BATCH_AXES`), so every device holds `batch / num_devices` examples. Parameters,
optimizer state and the Polyak average are replicated over 'data' and, when the
'fsdp' axis has more than one device, each large array is split over 'fsdp'
along one of its dimensions (ZeRO-3 / fully-sharded data parallelism): XLA
all-gathers a layer's weights where they are used and reduces their gradients
to the owning shards. With `fsdp=1` this is plain data parallelism with replicated state.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import mixing

BATCH_AXES = ("data", "fsdp")
PyTree = Any


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `('data', 'fsdp')` mesh of `data * fsdp` devices.

  Args:
    data: devices on the 'data' axis; -1 (or 0): all devices not on 'fsdp'.
    fsdp: devices over which each large parameter array is split (>= 1).
    devices: default `jax.devices()` (all devices of all processes).
  Returns:
    A Mesh of shape {'data': data, 'fsdp': fsdp}; neighbouring devices share an
    'fsdp' group, so its gathers stay within a host where they can.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh fsdp={fsdp} must be a positive divisor of the {len(devices)} "
                     "devices.")
  n_data = len(devices) // fsdp if data in (-1, 0) else data
  if n_data < 1 or n_data * fsdp > len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {max(n_data, 1) * fsdp} devices; "
                     f"{len(devices)} are available.")
  if jax.process_count() > 1 and n_data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} uses {n_data * fsdp} of "
                     f"{len(devices)} devices: multi-host runs must use all of them.")
  grid = np.asarray(devices[:n_data * fsdp], dtype=object).reshape(n_data, fsdp)
  return Mesh(grid, ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_axes(mesh: Mesh):
  """The mesh axis name(s) the batch is split over: 'data', or ('data', 'fsdp')."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes[0] if len(axes) == 1 else axes


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = 2 ** 14) -> P:
  """The PartitionSpec of one array: its largest dimension divisible by `fsdp` on 'fsdp'.

  Ties go to the later dimension (output features). Arrays smaller than
  `min_size` elements (biases, norms, scalars) and arrays with no dimension
  divisible by `fsdp` stay replicated.
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % fsdp == 0]
  if not dims:
    return P()
  spec = [None] * len(shape)
  spec[int(dims[0])] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, tree: PyTree, min_size: int = 2 ** 14) -> PyTree:
  """NamedShardings for a state pytree (arrays or `jax.ShapeDtypeStruct`s).

  Every leaf is replicated over 'data'; with an 'fsdp' axis of size > 1, large
  leaves are split over it (see `fsdp_spec`). PRNG keys and scalars stay replicated.
  """
  fsdp = dict(mesh.shape).get("fsdp", 1)

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

  return jax.tree_util.tree_map(one, tree)


def num_batch_shards(mesh: Mesh) -> int:
  """Number of pieces the global batch is split into (every device of the mesh)."""
  return mixing.num_shards(mesh, batch_axes(mesh))


def global_batch(batch: dict[str, np.ndarray], target: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays [B * processes, ...] from this process's rows [B, ...], laid out as `target`."""
  def put(x):
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(target, x, shape)
  return jax.tree_util.tree_map(put, batch)


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], target: NamedSharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays of this process's batches, `size` of them already sent to the devices.

  The host-to-device copies of the next batches overlap the current step. A
  training loop whose data position is the step number drops the batches
  fetched ahead of a preemption and reads them again on resume.
  """
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(global_batch(batch, target))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue
