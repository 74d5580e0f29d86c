"""The experiments' data: scikit-learn's small tables and 8x8 digits, splits, standardisation.

`mixjax.input_pipeline` serves the digits standardised, with one fixed split,
for `train.py`; the experiments need the pixels in [0, 1] (the attacks clip to
that range) and a split per seed. `split` and `standardize` do what the input
pipeline's private `_split_indices` and `_standardise` do (the same per-class
draws; `split` also shuffles the order), which the package does not export.
"""

from __future__ import annotations

import numpy as np

TABLES = ("iris", "wine", "breast_cancer", "digits")


def load_tabular(name: str) -> tuple[np.ndarray, np.ndarray, int]:
  """A small table shipped with scikit-learn: (x f32[N, D], y int32[N], num_classes).

  name: 'iris', 'wine', 'breast_cancer' or 'digits' (8x8 images, flattened, / 16).
  """
  from sklearn import datasets
  if name not in TABLES:
    raise ValueError(f"Unknown table {name!r}; choose one of {sorted(TABLES)}.")
  d = getattr(datasets, f"load_{name}")()
  x = d.data.astype(np.float32)
  if name == "digits":
    x = x / 16.0
  y = d.target.astype(np.int32)
  return x, y, int(y.max()) + 1


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1797 8x8 digits as images f32[N, 8, 8, 1] in [0, 1], labels int32[N]."""
  x, y, _ = load_tabular("digits")
  return x.reshape(-1, 8, 8, 1), y


def split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train indices, test indices), shuffled with `seed`.

  Per class, `max(1, round(test_fraction * n_c))` examples go to the test set.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    k = max(1, int(round(test_fraction * len(idx))))
    test.append(idx[:k])
    train.append(idx[k:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Zero mean, unit variance per feature, with the training statistics (f32)."""
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
  return [((x - mean) / std).astype(np.float32) for x in (train,) + others]
