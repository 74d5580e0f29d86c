"""Step-indexed iterators over in-memory datasets: a batch is a pure function of the step.

The training batch for step `s` is a pure function of (seed, s): example
order comes from a permutation per epoch (`default_rng([seed, epoch])`) and the
augmentation parameters of the global batch from `default_rng([seed, 1, s])`.
So resuming at step `s` needs only `s` (the iterator state), and the global
batch does not depend on how many hosts share it: host `p` of `P` takes rows
`[p*B/P, (p+1)*B/P)` of the global batch (then
`jax.make_array_from_process_local_data` assembles the global array).

Untied MixUp pairing (`epoch_pairing`): each global batch of `B` holds `B/2`
pairs (a_k, b_k) from two independently shuffled copies of the training set,
laid out in every group (one group per data shard) as `[a_1..a_m, b_m..b_1]`,
so the 'reverse' pairing inside each shard mixes a_k with b_k.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional

import numpy as np

from mixjax.input_pipeline.augment import augment_batch, eval_transform, normalise


def _host_normalise(x: np.ndarray, source_dtype: np.dtype, name: str) -> np.ndarray:
  """The host's half of the normalisation: float images here, uint8 ones on the device.

  uint8 images that stayed uint8 are left for `augment.device_normaliser`
  (run by the train and eval steps); uint8 images resized to float32 (Inception
  crops, still on the [0, 255] scale) are scaled to [0, 1] and normalised here.
  """
  if source_dtype == np.uint8 and x.dtype != np.uint8:
    x = x / np.float32(255.0)
  return normalise(x, name)


class TrainIterator:
  """Process-local training batches, a pure function of the step.

  Yields {'inputs': [B/P, ...], 'labels': int32[B/P]} (uint8 images stay
  uint8 unless resized: normalise them on the device with
  `augment.device_normaliser`); `state()` / the
  `start_step` argument give exact resumption. With `prefetch > 0` a
  background thread prepares the next batches.
  """

  def __init__(self, dataset: Any, global_batch: int, *, seed: int, augment: str = "none",
               out_shape: Optional[tuple[int, ...]] = None, normalize: str = "none",
               process_index: int = 0, process_count: int = 1, epoch_pairing: bool = False,
               num_groups: int = 1, start_step: int = 0, prefetch: int = 2):
    n = len(dataset)
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} must be divisible by the {process_count} "
                       "processes.")
    per_step = global_batch // 2 if epoch_pairing else global_batch
    if epoch_pairing and (global_batch % (2 * num_groups)):
      raise ValueError(f"epoch_pairing needs batch_size={global_batch} divisible by "
                       f"2 x {num_groups} data shards.")
    if per_step > n:
      raise ValueError(f"batch_size={global_batch} is larger than the dataset ({n} examples).")
    self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
    self.augment, self.normalize = augment, normalize
    self.out_shape = tuple(out_shape) if out_shape else None
    self.process_index, self.process_count = process_index, process_count
    self.epoch_pairing, self.num_groups = epoch_pairing, num_groups
    self.steps_per_epoch = n // per_step
    self.step = start_step
    self.prefetch = prefetch
    self._queue: Optional[queue.Queue] = None
    self._thread: Optional[threading.Thread] = None
    self._stop = threading.Event()
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

  def _perm(self, epoch: int, copy: int) -> np.ndarray:
    key = (epoch, copy)
    if key not in self._perm_cache:
      self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] >= epoch - 1}
      self._perm_cache[key] = np.random.default_rng([self.seed, epoch, copy]).permutation(
          len(self.dataset))
    return self._perm_cache[key]

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices int[B] of the global batch of `step`."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    if not self.epoch_pairing:
      b = self.global_batch
      return self._perm(epoch, 0)[pos * b:(pos + 1) * b]
    m = self.global_batch // 2
    a = self._perm(epoch, 1)[pos * m:(pos + 1) * m]
    bb = self._perm(epoch, 2)[pos * m:(pos + 1) * m]
    g = self.num_groups
    a, bb = a.reshape(g, m // g), bb.reshape(g, m // g)
    return np.concatenate([a, bb[:, ::-1]], axis=1).reshape(-1)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`."""
    idx = self.global_indices(step)
    rng = np.random.default_rng([self.seed, 1, step])
    local = self.global_batch // self.process_count
    rows = slice(self.process_index * local, (self.process_index + 1) * local)
    x, y = self.dataset.get(idx)
    if (x.dtype.kind == "f" or x.dtype == np.uint8) and x.ndim == 4 and self.augment != "none":
      x = _host_normalise(augment_batch(x, self.augment, rng, self.out_shape or x.shape[1:]),
                          x.dtype, self.normalize)
    else:
      x = _host_normalise(x, x.dtype, self.normalize)
    return {"inputs": np.ascontiguousarray(x[rows]), "labels": y[rows].astype(np.int32)}

  def state(self) -> dict[str, int]:
    return {"step": self.step}

  def _worker(self, start: int) -> None:
    step = start
    while not self._stop.is_set():
      try:
        item = (step, self.batch_at(step))
      except Exception as e:  # Surface errors in the consumer.
        item = (step, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.prefetch <= 0:
      batch = self.batch_at(self.step)
    else:
      if self._thread is None:
        self._queue = queue.Queue(self.prefetch)
        self._thread = threading.Thread(target=self._worker, args=(self.step,), daemon=True)
        self._thread.start()
      step, batch = self._queue.get()
      assert step == self.step, (step, self.step)
      if isinstance(batch, Exception):
        raise batch
    self.step += 1
    return batch

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None


def eval_batches(dataset: Any, global_batch: int, *, augment: str = "none",
                 out_shape: Optional[tuple[int, ...]] = None, normalize: str = "none",
                 process_index: int = 0, process_count: int = 1,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Process-local eval batches over the whole split, zero-padded, with 'mask' f32 (1 = real)."""
  n = len(dataset)
  local = global_batch // process_count
  for start in range(0, n, global_batch):
    idx = np.arange(start, min(start + global_batch, n))
    x, y = dataset.get(idx)
    x = _host_normalise(eval_transform(x, augment, out_shape or x.shape[1:]), x.dtype, normalize)
    pad = global_batch - len(idx)
    mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    rows = slice(process_index * local, (process_index + 1) * local)
    yield {"inputs": x[rows], "labels": y[rows].astype(np.int32), "mask": mask[rows]}
