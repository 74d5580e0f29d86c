"""In-memory data sources: scikit-learn, synthetic, npz and tsv files; `load_arrays`.

Datasets (`config.dataset.name`):
  digits     scikit-learn's 8x8 digits (shipped with scikit-learn): a fixed
             stratified split of 1438 train / 359 test images, f32[8, 8, 1]
             standardised with the training mean and std.
  iris       scikit-learn's iris (UCI), 100 train / 50 test, 4 standardised features.
  synthetic  random data of `input_shape` / `input_dtype` with learnable
             class structure; `train_examples` / `eval_examples` examples.
  npz        local file `{data_dir}/{train_split}.npz` and `{eval_split}.npz`
             with arrays `x` (N, ...) and `y` int (N,) (e.g. UCI tables); `x`
             is cast to `input_dtype`, except uint8 images [N, H, W, C], which
             stay uint8 and are scaled to [0, 1] and normalised on the device
             as TFDS images are (with 'per_dataset': standardised here).
  tsv        local text files `{data_dir}/{split}.tsv`, one `label<TAB>text`
             per line (TREC, SST-2); a whitespace/punctuation vocabulary of
             `vocab_size` is built from the training split (0 = padding,
             1 = unknown), sentences are cut/padded to `input_shape[0]` tokens.
  tfds       image and audio datasets stream through `tfds_data`; text datasets
             (`input_dtype='int32'`, e.g. 'glue/sst2') are read into memory here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mixjax.input_pipeline.datasets import ArrayDataset, SyntheticDataset
from mixjax.input_pipeline.tfds_data import tfds_text
from mixjax.input_pipeline.text import text_splits


def split_indices(labels: np.ndarray, test_fraction: float, rng: np.random.Generator,
                  min_test: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A stratified split: (train, test) int64 indices into `labels` int[N].

  Per class (in sorted order), its indices are permuted with `rng` and the
  first `max(min_test, round(test_fraction * n_c))` go to the test set. Each
  output lists the classes in turn (sort or shuffle it as needed).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = max(int(min_test), int(round(test_fraction * len(idx))))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.concatenate(train), np.concatenate(test)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Zero mean, unit variance per feature with `train`'s statistics: [train, *others] as f32."""
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
  return [((x - mean) / std).astype(np.float32) for x in (train,) + others]


def _sklearn(name: str) -> dict[str, ArrayDataset]:
  from sklearn import datasets
  if name == "digits":
    d = datasets.load_digits()
    x, y = d.images.astype(np.float32)[..., None] / 16.0, d.target.astype(np.int32)
    test_fraction, classes = 0.2, 10
  else:
    d = datasets.load_iris()
    x, y = d.data.astype(np.float32), d.target.astype(np.int32)
    test_fraction, classes = 1.0 / 3.0, 3
  tr, te = (np.sort(i) for i in split_indices(y, test_fraction, np.random.default_rng(0)))
  if name == "digits":  # One mean/std over all pixels (keeps the image structure).
    mean, std = x[tr].mean(), x[tr].std()
    xtr, xte = (x[tr] - mean) / std, (x[te] - mean) / std
  else:
    xtr, xte = standardise(x[tr], x[te])
  return {"train": ArrayDataset(xtr.astype(np.float32), y[tr], classes),
          "test": ArrayDataset(xte.astype(np.float32), y[te], classes)}


def _read_tsv(path: str) -> tuple[list[str], list[str]]:
  if not os.path.isfile(path):
    raise ValueError(f"dataset.name='tsv': missing {path}; expected one 'label<TAB>text' per line "
                     "(see mixjax/input_pipeline/sources.py).")
  labels, texts = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line:
        continue
      if "\t" not in line:
        raise ValueError(f"{path}:{n}: expected 'label<TAB>text', got {line[:60]!r}.")
      label, text = line.split("\t", 1)
      labels.append(label)
      texts.append(text)
  return labels, texts


def corrupt_labels(labels: np.ndarray, fraction: float, num_classes: int,
                   seed: int) -> np.ndarray:
  """Replaces the labels of `round(fraction * N)` random examples by uniform random labels.

  As in Zhang et al. (2017): a replaced label may by chance equal the true one.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"label_corruption must be in [0, 1], got {fraction}.")
  labels = np.array(labels, np.int32)
  rng = np.random.default_rng([seed, 11])
  idx = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
  labels[idx] = rng.integers(0, num_classes, len(idx))
  return labels


def load_arrays(dcfg: Any, seed: int = 0) -> dict[str, Any]:
  """{'train': dataset, 'eval': dataset} for the in-memory sources (not 'tfds')."""
  name = dcfg.name
  if name in ("digits", "iris"):
    d = _sklearn(name)
    out = {"train": d["train"], "eval": d["test"]}
  elif name == "synthetic":
    n_train = dcfg.train_examples or 1024
    n_eval = dcfg.eval_examples or 256
    shape = tuple(dcfg.input_shape)
    mk = lambda n, s: SyntheticDataset(n, shape, dcfg.num_classes, dcfg.input_dtype,  # noqa: E731
                                       dcfg.vocab_size, s)
    out = {"train": mk(n_train, seed), "eval": mk(n_eval, seed + 1)}
  elif name == "npz":
    out = {}
    for key, split in (("train", dcfg.train_split), ("eval", dcfg.eval_split)):
      path = os.path.join(dcfg.data_dir or ".", split + ".npz")
      if not os.path.isfile(path):
        raise ValueError(f"dataset.name='npz': missing {path}; expected arrays 'x' (N, ...) and "
                         "'y' (N,) int class ids (see mixjax/input_pipeline/sources.py).")
      with np.load(path) as f:
        x = f["x"]
        images = x.dtype == np.uint8 and x.ndim == 4 and dcfg.normalize != "per_dataset"
        out[key] = ArrayDataset(x if images else x.astype(dcfg.input_dtype),
                                f["y"].astype(np.int32), dcfg.num_classes)
    if dcfg.normalize == "per_dataset":
      out["train"].inputs, out["eval"].inputs = standardise(out["train"].inputs,
                                                             out["eval"].inputs)
  elif name == "tsv":
    read = lambda split: _read_tsv(os.path.join(dcfg.data_dir or ".", split + ".tsv"))  # noqa
    out = text_splits(read(dcfg.train_split), read(dcfg.eval_split), dcfg.vocab_size,
                      dcfg.input_shape[0], dcfg.num_classes)
  elif name == "tfds" and dcfg.input_dtype == "int32":
    out = tfds_text(dcfg)
  else:
    raise ValueError(f"dataset.name={name!r} is not an in-memory dataset; choose one of "
                     "digits, iris, synthetic, npz, tsv, or tfds with input_dtype='int32' (image "
                     "and audio tfds datasets stream through TfdsTrainIterator).")
  if dcfg.label_corruption:
    tr = out["train"]
    if not isinstance(tr, ArrayDataset):
      tr = ArrayDataset(*tr.get(np.arange(len(tr))), tr.num_classes)
    tr.labels = corrupt_labels(tr.labels, dcfg.label_corruption, dcfg.num_classes,
                               dcfg.corruption_seed)
    out["train"] = tr
  return out
