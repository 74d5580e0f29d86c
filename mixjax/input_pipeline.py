"""Input pipelines: in-memory NumPy datasets and TFDS, deterministic by step.

The training batch for step `s` is a pure function of (seed, s): example
order comes from a permutation per epoch (`default_rng([seed, epoch])`) and the
augmentation parameters of the global batch from `default_rng([seed, 1, s])`.
So resuming at step `s` needs only `s` (the iterator state), and the global
batch does not depend on how many hosts share it: host `p` of `P` takes rows
`[p*B/P, (p+1)*B/P)` of the global batch (then
`jax.make_array_from_process_local_data` assembles the global array).

Datasets (`config.dataset.name`):
  digits     scikit-learn's 8x8 digits (shipped with scikit-learn): a fixed
             stratified split of 1438 train / 359 test images, f32[8, 8, 1]
             standardised with the training mean and std.
  iris       scikit-learn's iris (UCI), 100 train / 50 test, 4 standardised features.
  synthetic  random data of `input_shape` / `input_dtype` with learnable
             class structure; `train_examples` / `eval_examples` examples.
  npz        local file `{data_dir}/{train_split}.npz` and `{eval_split}.npz`
             with arrays `x` (N, ...) and `y` int (N,) (e.g. UCI tables).
  tsv        local text files `{data_dir}/{split}.tsv`, one `label<TAB>text`
             per line (TREC, SST-2); a whitespace/punctuation vocabulary of
             `vocab_size` is built from the training split (0 = padding,
             1 = unknown), sentences are cut/padded to `input_shape[0]` tokens.
  tfds       `tfds_name` from TensorFlow Datasets (needs the optional extra
             `pip install mixjax[data]`, i.e. tensorflow-cpu + tensorflow-datasets,
             and the dataset prepared in `data_dir`; ImageNet must be
             downloaded manually, see the TFDS catalog).

Augmentations (`config.dataset.augment`): 'inception' (random area 8-100%,
aspect 3/4-4/3 crop, bilinear resize, flip; eval: 87.5% centre crop),
'cifar' (4-pixel zero pad, random crop, flip), 'flip', 'none'.
Untied MixUp pairing (`epoch_pairing`): each global batch of `B` holds `B/2`
pairs (a_k, b_k) from two independently shuffled copies of the training set,
laid out in every group (one group per data shard) as `[a_1..a_m, b_m..b_1]`,
so the 'reverse' pairing inside each shard mixes a_k with b_k.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import threading
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np

PyTree = Any

NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


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


# ----------------------------------------------------------------------------- loading


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
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
  tr, te = _split_indices(y, test_fraction, seed=0)
  if name == "digits":  # One mean/std over all pixels (keeps the image structure).
    mean, std = x[tr].mean(), x[tr].std()
    xtr, xte = (x[tr] - mean) / std, (x[te] - mean) / std
  else:
    xtr, xte = _standardise(x[tr], x[te])
  return {"train": ArrayDataset(xtr.astype(np.float32), y[tr], classes),
          "test": ArrayDataset(xte.astype(np.float32), y[te], classes)}


_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
  """Lower-cased word and punctuation tokens."""
  return _TOKEN.findall(text.lower())


def build_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
  """Most frequent tokens -> ids 2.. (0 = padding, 1 = unknown); ties broken alphabetically."""
  counts = Counter(t for s in texts for t in tokenize(s))
  ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(vocab_size - 2, 0)]
  return {tok: i + 2 for i, (tok, _) in enumerate(ordered)}


def encode(texts: list[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
  """int32[N, max_len] token ids, truncated / zero-padded."""
  out = np.zeros((len(texts), max_len), np.int32)
  for i, s in enumerate(texts):
    ids = [vocab.get(t, 1) for t in tokenize(s)][:max_len]
    out[i, :len(ids)] = ids
  return out


def _read_tsv(path: str) -> tuple[list[str], list[str]]:
  if not os.path.isfile(path):
    raise ValueError(f"dataset.name='tsv': missing {path}; expected one 'label<TAB>text' per line "
                     "(see mixjax/input_pipeline.py).")
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


def _text_splits(train: tuple[list, list], evals: tuple[list, list], vocab_size: int,
                 max_len: int, num_classes: int) -> dict[str, ArrayDataset]:
  names = sorted(set(map(str, train[0])), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
  if len(names) > num_classes:
    raise ValueError(f"the training split has {len(names)} labels {names[:10]}... but "
                     f"dataset.num_classes={num_classes}.")
  ids = {n: i for i, n in enumerate(names)}
  vocab = build_vocab(train[1], vocab_size)
  out = {}
  for split, (labels, texts) in (("train", train), ("eval", evals)):
    unknown = sorted(set(map(str, labels)) - set(ids))
    if unknown:
      raise ValueError(f"labels {unknown[:5]} of the {split} split do not occur in training.")
    out[split] = ArrayDataset(encode(texts, vocab, max_len),
                              np.array([ids[str(l)] for l in labels], np.int32), num_classes)
  return out


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
                         "'y' (N,) int class ids (see mixjax/input_pipeline.py).")
      with np.load(path) as f:
        out[key] = ArrayDataset(f["x"].astype(dcfg.input_dtype), f["y"].astype(np.int32),
                                dcfg.num_classes)
    if dcfg.normalize == "per_dataset":
      out["train"].inputs, out["eval"].inputs = _standardise(out["train"].inputs,
                                                             out["eval"].inputs)
  elif name == "tsv":
    read = lambda split: _read_tsv(os.path.join(dcfg.data_dir or ".", split + ".tsv"))  # noqa
    out = _text_splits(read(dcfg.train_split), read(dcfg.eval_split), dcfg.vocab_size,
                       dcfg.input_shape[0], dcfg.num_classes)
  elif name == "tfds" and dcfg.input_dtype == "int32":
    out = _tfds_text(dcfg)
  else:
    raise ValueError(f"dataset.name={name!r} is not an in-memory dataset; choose one of "
                     "digits, iris, synthetic, npz, tsv (or tfds through make_pipelines).")
  if dcfg.label_corruption:
    tr = out["train"]
    if not isinstance(tr, ArrayDataset):
      tr = ArrayDataset(*tr.get(np.arange(len(tr))), tr.num_classes)
    tr.labels = corrupt_labels(tr.labels, dcfg.label_corruption, dcfg.num_classes,
                               dcfg.corruption_seed)
    out["train"] = tr
  return out


# ----------------------------------------------------------------------------- augmentation


def _bilinear_crops(images: np.ndarray, top: np.ndarray, left: np.ndarray, h: np.ndarray,
                    w: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Crops box (top, left, h, w) of each image [B, H, W, C] and resizes it bilinearly.

  Pixel centres are aligned (as `tf.image.resize`, half_pixel_centers); per
  image, two row gathers and two column gathers: O(out_h * (W + out_w) * C).
  """
  height, width = images.shape[1:3]
  out = np.empty((images.shape[0], out_h, out_w) + images.shape[3:], np.float32)

  def coords(start, size, n, limit):
    pos = start + (np.arange(n) + 0.5) * (size / n) - 0.5
    pos = np.clip(pos, 0, limit - 1)
    i0 = np.floor(pos).astype(np.int64)
    return i0, np.minimum(i0 + 1, limit - 1), (pos - i0).astype(np.float32)

  for i, img in enumerate(images):
    y0, y1, wy = coords(top[i], h[i], out_h, height)
    x0, x1, wx = coords(left[i], w[i], out_w, width)
    r0 = img[y0].astype(np.float32)
    rows = r0 + (img[y1] - r0) * wy[:, None, None]
    c0 = rows[:, x0]
    out[i] = c0 + (rows[:, x1] - c0) * wx[None, :, None]
  return out


def inception_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                    area: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> tuple[np.ndarray, ...]:
  """Random crop boxes (top, left, h, w), int[n] each, as in Inception / Goyal et al.

  Up to `attempts` tries of area fraction U(area) and log-uniform aspect ratio;
  images with no valid try get the whole image.
  """
  target = height * width * rng.uniform(*area, (n, attempts))
  logr = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts))
  w = np.round(np.sqrt(target * np.exp(logr))).astype(np.int64)
  h = np.round(np.sqrt(target / np.exp(logr))).astype(np.int64)
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = np.argmax(ok, axis=1)
  found = ok[np.arange(n), first]
  h = np.where(found, h[np.arange(n), first], height)
  w = np.where(found, w[np.arange(n), first], width)
  u = rng.uniform(size=(2, n))
  top = np.floor(u[0] * (height - h + 1)).astype(np.int64)
  left = np.floor(u[1] * (width - w + 1)).astype(np.int64)
  return top, left, h, w


def augment_batch(images: np.ndarray, kind: str, rng: np.random.Generator,
                  out_shape: tuple[int, ...]) -> np.ndarray:
  """Training augmentation of a batch of images f32[B, H, W, C] -> f32[B, *out_shape].

  The random parameters come from `rng` for the whole batch, in a fixed order.
  """
  if kind == "none" or images.ndim != 4:
    return images
  b, height, width = images.shape[:3]
  if kind == "inception":
    top, left, h, w = inception_boxes(rng, b, height, width)
    images = _bilinear_crops(images, top, left, h, w, out_shape[0], out_shape[1])
  elif kind == "cifar":
    pad = 4
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, (2, b))
    rows = (dy[:, None] + np.arange(height)[None])[:, :, None, None]
    cols = (dx[:, None] + np.arange(width)[None])[:, None, :, None]
    images = np.take_along_axis(np.take_along_axis(padded, rows, axis=1), cols, axis=2)
  elif kind != "flip":
    raise ValueError(f"augment={kind!r}; choose one of none, flip, cifar, inception.")
  flip = rng.uniform(size=b) < 0.5
  images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return np.ascontiguousarray(images, dtype=np.float32)


def eval_transform(images: np.ndarray, kind: str, out_shape: tuple[int, ...]) -> np.ndarray:
  """Eval preprocessing: 87.5% centre crop + resize for 'inception', else identity."""
  if kind != "inception" or images.ndim != 4:
    return images
  b, height, width = images.shape[:3]
  h, w = int(round(0.875 * height)), int(round(0.875 * width))
  full = lambda v: np.full(b, v, np.int64)  # noqa: E731
  return _bilinear_crops(images, full((height - h) // 2), full((width - w) // 2), full(h),
                         full(w), out_shape[0], out_shape[1])


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
  if name in ("none", "per_dataset") or x.dtype.kind != "f":
    return x
  if name not in NORMALIZE:
    raise ValueError(f"dataset.normalize={name!r}; choose none, per_dataset or {sorted(NORMALIZE)}.")
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZE[name])
  return (x - mean) / std


# ----------------------------------------------------------------------------- iterators


class TrainIterator:
  """Process-local training batches, a pure function of the step.

  Yields {'inputs': [B/P, ...], 'labels': int32[B/P]}; `state()` / the
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
    if x.dtype.kind == "f" and x.ndim == 4 and self.augment != "none":
      x = augment_batch(x, self.augment, rng, self.out_shape or x.shape[1:])
    x = _normalise(x, self.normalize)
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
    x = _normalise(eval_transform(x, augment, out_shape or x.shape[1:]), normalize)
    pad = global_batch - len(idx)
    mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    rows = slice(process_index * local, (process_index + 1) * local)
    yield {"inputs": x[rows], "labels": y[rows].astype(np.int32), "mask": mask[rows]}


# ----------------------------------------------------------------------------- TFDS


def _import_tfds():
  try:
    import tensorflow as tf  # noqa: F401
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        "dataset.name='tfds' needs TensorFlow Datasets, an optional extra: "
        "`pip install 'mixjax[data]'` (tensorflow-cpu, tensorflow-datasets), then prepare the "
        "dataset with `tfds build <name> --data_dir <dir>` (ImageNet: download the archives "
        "manually, see https://www.tensorflow.org/datasets/catalog/imagenet2012). Offline, use "
        "--config.dataset.name=synthetic.") from e
  return tf, tfds


def _tfds_builder(dcfg: Any):
  tf, tfds = _import_tfds()
  where = dcfg.data_dir or "~/tensorflow_datasets"
  build = (f"run `tfds build {dcfg.tfds_name} --data_dir <dir>` (or prepare it with your own "
           "builder) and set config.dataset.data_dir")
  try:
    builder = tfds.builder(dcfg.tfds_name, data_dir=dcfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset.tfds_name={dcfg.tfds_name!r} is neither a TFDS catalogue "
                     f"name nor a dataset prepared in {where}: {build}.") from e
  splits = dict(builder.info.splits)
  if not splits:
    raise ValueError(f"TFDS dataset {dcfg.tfds_name!r} is not prepared in {where}: {build}.")
  for key in ("train_split", "eval_split"):
    base = dcfg[key].split("[")[0]
    if base not in splits:
      raise ValueError(f"config.dataset.{key}={dcfg[key]!r} is not a split of TFDS "
                       f"{dcfg.tfds_name!r}; its splits are {sorted(splits)}.")
  return tf, tfds, builder


def _tfds_text(dcfg: Any) -> dict[str, ArrayDataset]:
  """Text classification TFDS datasets (e.g. 'glue/sst2') as in-memory token arrays."""
  _, tfds, builder = _tfds_builder(dcfg)

  def read(split):
    labels, texts = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      text = ex.get("sentence", ex.get("text"))
      labels.append(str(int(ex["label"])))
      texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return labels, texts
  return _text_splits(read(dcfg.train_split), read(dcfg.eval_split), dcfg.vocab_size,
                      dcfg.input_shape[0], dcfg.num_classes)


def _check_image_shape(builder: Any, dcfg: Any) -> None:
  """ValueError, before any reading, if the stored images cannot become `input_shape`."""
  feature = builder.info.features["image"] if "image" in builder.info.features else None
  if feature is None or dcfg.augment == "inception":
    return
  stored, want = tuple(feature.shape), tuple(dcfg.input_shape)
  if None in stored[:2]:
    raise ValueError(f"TFDS {dcfg.tfds_name!r} has images of varying size {stored}: set "
                     "config.dataset.augment='inception' (random-resized crop for training, "
                     "centre crop for evaluation), which resizes them to input_shape.")
  if stored[:2] != want[:2] or (stored[2] is not None and stored[2] != want[2]):
    raise ValueError(f"config.dataset.input_shape={want} but TFDS {dcfg.tfds_name!r} stores "
                     f"images of shape {stored}: set input_shape to match, or "
                     "augment='inception' to crop and resize.")


def tfds_num_examples(dcfg: Any, split: str) -> int:
  _, _, builder = _tfds_builder(dcfg)
  return builder.info.splits[split].num_examples


def _tf_preprocess(tf, dcfg: Any, train: bool, seed_pair: Any):
  """Returns fn(features) -> (inputs f32, label int32) in TensorFlow."""
  shape = tuple(dcfg.input_shape)
  kind = dcfg.augment
  mean_std = NORMALIZE.get(dcfg.normalize)

  def image_fn(features, seed):
    image = features["image"]
    if kind == "inception":
      if image.dtype == tf.string:
        img_shape = tf.io.extract_jpeg_shape(image)
      else:
        img_shape = tf.shape(image)
      if train:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            img_shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
        crop = tf.stack([begin[0], begin[1], size[0], size[1]])
      else:
        h, w = img_shape[0], img_shape[1]
        side = tf.cast(0.875 * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
        crop = tf.stack([(h - side) // 2, (w - side) // 2, side, side])
      if image.dtype == tf.string:
        image = tf.image.decode_and_crop_jpeg(image, crop, channels=shape[-1])
      else:
        image = tf.image.crop_to_bounding_box(image, crop[0], crop[1], crop[2], crop[3])
      image = tf.image.resize(image, shape[:2], method="bilinear")
    else:
      if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=shape[-1], expand_animations=False)
      image = tf.cast(image, tf.float32)
      if train and kind == "cifar":
        image = tf.image.pad_to_bounding_box(image, 4, 4, shape[0] + 8, shape[1] + 8)
        image = tf.image.stateless_random_crop(image, shape, seed=seed)
    if train and kind in ("inception", "cifar", "flip"):
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    image = tf.cast(image, tf.float32) / 255.0
    if mean_std is not None:
      image = (image - tf.constant(mean_std[0])) / tf.constant(mean_std[1])
    return tf.ensure_shape(image, shape)

  def audio_fn(features):
    # Speech commands: 1 s at 16 kHz -> log |STFT| of 20 ms windows every 10 ms,
    # 160 frequency bins x 101 frames (mixup paper: 160x101 spectrograms).
    audio = tf.cast(features["audio"], tf.float32) / 32768.0
    audio = tf.pad(audio, [[0, tf.maximum(0, 16000 - tf.shape(audio)[0])]])[:16000]
    spec = tf.abs(tf.signal.stft(audio, frame_length=320, frame_step=160, fft_length=318,
                                 pad_end=True))
    spec = tf.math.log(spec + 1e-6)
    spec = tf.pad(spec, [[0, 101 - tf.shape(spec)[0]], [0, 0]])[:101]
    return tf.ensure_shape(tf.transpose(spec)[..., None], shape)

  def fn(index, features):
    seed = tf.stack([tf.cast(seed_pair, tf.int64), tf.cast(index, tf.int64)])
    label = tf.cast(features["label"], tf.int32)
    if dcfg.label_corruption and train:
      h = tf.strings.to_hash_bucket_fast(
          tf.strings.join([features["tfds_id"], str(dcfg.corruption_seed)]), 2 ** 31 - 1)
      corrupt = tf.cast(h % 1000003, tf.float32) < dcfg.label_corruption * 1000003
      label = tf.where(corrupt, tf.cast((h // 1000003) % dcfg.num_classes, tf.int32), label)
    x = audio_fn(features) if "audio" in features else image_fn(features, seed)
    return {"inputs": x, "labels": label}
  return fn


class TfdsTrainIterator:
  """TFDS training batches for this process (tf.data, deterministic, resumable by skipping).

  The per-host split is `tfds.split_for_jax_process`; the stream is repeated,
  shuffled with a fixed seed, augmented with stateless ops seeded by (seed,
  element index), batched, and `start_step` batches are skipped on resume.
  """

  def __init__(self, dcfg: Any, global_batch: int, *, seed: int, process_index: int = 0,
               process_count: int = 1, start_step: int = 0, shuffle_buffer: int = 50_000,
               threads: Optional[int] = None):
    """`threads`: size of a private tf.data thread pool (default: TF's shared pool)."""
    tf, tfds, builder = _tfds_builder(dcfg)
    _check_image_shape(builder, dcfg)
    split = tfds.split_for_jax_process(dcfg.train_split, process_index=process_index,
                                       process_count=process_count)
    read = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True)
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read, decoders=decoders)
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
      opts.threading.private_threadpool_size = threads
    ds = ds.with_options(opts).repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
    ds = ds.map(_tf_preprocess(tf, dcfg, True, seed), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(global_batch // process_count, drop_remainder=True).skip(start_step)
    self._it = iter(tfds.as_numpy(ds.prefetch(dcfg.prefetch or tf.data.AUTOTUNE)))
    self.step = start_step
    self.steps_per_epoch = builder.info.splits[dcfg.train_split].num_examples // global_batch

  def __iter__(self):
    return self

  def __next__(self):
    self.step += 1
    return next(self._it)

  def state(self) -> dict[str, int]:
    return {"step": self.step}

  def close(self) -> None:
    pass


def tfds_eval_batches(dcfg: Any, global_batch: int, *, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """TFDS eval batches for this process, padded, with 'mask'."""
  tf, tfds, builder = _tfds_builder(dcfg)
  _check_image_shape(builder, dcfg)
  split = tfds.split_for_jax_process(dcfg.eval_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=False)
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  ds = ds.enumerate().map(_tf_preprocess(tf, dcfg, False, 0), num_parallel_calls=tf.data.AUTOTUNE)
  local = global_batch // process_count
  # Every process must run the same number of eval steps: pad with empty batches.
  total = builder.info.splits[dcfg.eval_split].num_examples
  num_batches = -(-(-(-total // process_count)) // local)
  template = None
  for batch in tfds.as_numpy(ds.batch(local)):
    n = len(batch["labels"])
    pad = local - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch["mask"] = mask
    template = batch
    num_batches -= 1
    yield batch
  for _ in range(max(num_batches, 0)):
    yield {k: np.zeros_like(v) for k, v in template.items()}
