"""The experiments' data: scikit-learn's small tables and 8x8 digits, splits, standardisation.

`mixjax.input_pipeline` serves the digits standardised, with one fixed split,
for `train.py`; the experiments need the pixels in [0, 1] (the attacks clip to
that range) and a split per seed: `split` is `input_pipeline.sources.split_indices`
with at least one test example per class, shuffled (standardise with
`sources.standardise`).
"""

from __future__ import annotations

import numpy as np

from mixjax.input_pipeline import sources

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
  rng = np.random.default_rng(seed)
  train, test = sources.split_indices(y, test_fraction, rng, min_test=1)
  return rng.permutation(train), rng.permutation(test)
