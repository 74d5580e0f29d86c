"""In-memory dataset types: a split is anything with `len()` and `get(indices)`.

`get(indices int[n]) -> (inputs [n, ...], labels int32[n])`; the iterators
(`mixjax.input_pipeline.iterators`) read a dataset only through these two.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ArrayDataset:
  """An in-memory split: inputs [N, ...] (float32 or int32 tokens), labels int32[N]."""
  inputs: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.inputs[indices], self.labels[indices]


@dataclasses.dataclass
class SyntheticDataset:
  """Synthetic data of any shape, generated on demand (no memory for big images).

  Float inputs: `0.5 * noise[i % 16] + (2 y / (C - 1) - 1)`: the mean encodes
  the class, so a model can learn it. Int inputs (tokens): noise tokens in
  [2, vocab) with the first token `2 + y`. Labels: `default_rng([seed, 7])`.
  """
  num_examples: int
  input_shape: tuple[int, ...]
  num_classes: int
  input_dtype: str = "float32"
  vocab_size: int = 1000
  seed: int = 0

  def __post_init__(self):
    rng = np.random.default_rng([self.seed, 7])
    self.labels = rng.integers(0, self.num_classes, self.num_examples).astype(np.int32)
    if self.input_dtype == "int32":
      self._bank = rng.integers(2, max(self.vocab_size, 3), (16,) + tuple(self.input_shape))
      self._bank = self._bank.astype(np.int32)
    else:
      self._bank = rng.standard_normal((16,) + tuple(self.input_shape)).astype(np.float32)

  def __len__(self) -> int:
    return self.num_examples

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = self.labels[indices]
    x = self._bank[np.asarray(indices) % 16].copy()
    if self.input_dtype == "int32":
      x[:, 0] = 2 + y % max(self.vocab_size - 2, 1)
    else:
      shift = 2.0 * y / max(self.num_classes - 1, 1) - 1.0
      x = 0.5 * x + shift.reshape((-1,) + (1,) * (x.ndim - 1)).astype(np.float32)
    return x, y
