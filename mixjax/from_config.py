"""A training config (`mixjax.config_utils.base_config()` schema) -> the run's parts.

`train.py` and the tests build a run from a config through these functions:

    mesh = from_config.mesh(config)
    module = from_config.model(config)
    objective = from_config.objective(config, "untied+amp", mesh)
    data = from_config.data(config, mesh)
    steps, per_epoch = from_config.total_steps(config, data.train_examples)

Nothing here compiles; `model` and `objective` are cheap enough to call up
front, so a bad `model.kwargs` or method fails before anything is traced.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mixjax import input_pipeline
from mixjax import methods
from mixjax import objectives
from mixjax import optim
from mixjax import sharding

ConfigDict = ml_collections.ConfigDict
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
Batch = dict[str, np.ndarray]


def mesh(config: ConfigDict) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh_data` x `config.mesh_fsdp` devices.

  Raises ValueError naming both fields when the devices do not fit.
  """
  try:
    return sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
  except ValueError as e:
    raise ValueError(f"config.mesh_data={config.mesh_data}, config.mesh_fsdp="
                     f"{config.mesh_fsdp}: {e}") from e


def output_size(config: ConfigDict) -> int:
  """Model outputs: class logits, or `mix.cosine_dim` features for the negative-cosine loss."""
  return config.mix.cosine_dim if config.mix.loss == "cosine" else config.dataset.num_classes


def model(config: ConfigDict, num_outputs: Optional[int] = None) -> Any:
  """The linen module `mixjax.models.get_model(config.model.name, **config.model.kwargs)`.

  num_outputs: the width of the output layer (default `output_size(config)`).
  `config.model.dtype` other than float32 is passed as `dtype` (compute dtype;
  parameters stay float32); text models (`dataset.input_dtype='int32'`) get
  `vocab_size=config.dataset.vocab_size` unless `model.kwargs` sets it.
  Raises ValueError when the kwargs do not fit the model.
  """
  from mixjax import models  # The model zoo is only needed here.
  n = output_size(config) if num_outputs is None else num_outputs
  kwargs = dict(config.model.kwargs)
  if config.model.dtype != "float32":
    kwargs["dtype"] = DTYPES[config.model.dtype]
  if config.dataset.input_dtype == "int32":  # Text: the embedding table covers the vocabulary.
    kwargs.setdefault("vocab_size", config.dataset.vocab_size)
  try:
    return models.get_model(config.model.name, num_classes=n, **kwargs)
  except TypeError as e:
    raise ValueError(f"config.model.kwargs {sorted(kwargs)} do not fit model "
                     f"{config.model.name!r}: {e}") from e



def objective(config: ConfigDict, method: str, mesh: Optional[Mesh]) -> objectives.Objective:
  """`methods.get_objective(method, ...)` with `config.mix`, `config.amp`, `config.mixupe`.

  The CutMix keys (`mix.cutmix_alpha`, `switch_prob`, `apply_prob`,
  `cutmix_minmax`, `correct_lam`; image shape `dataset.input_shape`),
  `mix.bce_threshold`, `mix.lam_scope` and the k-way keys (`mix.k`, `mix.k_largest_first`) are
  passed through; the ERM objective (ERM runs, `erm_warmup_steps`) ignores `k`.

  mesh: the training mesh; with `config.mix.shard_local`, pairs are drawn
  inside each device's shard of the batch (no cross-device traffic).
  """
  m = config.mix
  axis_name = sharding.batch_axes(mesh) if mesh is not None else "data"
  mixupe = dict(config.mixupe)
  mixupe["mean"] = None if mixupe["mean"] == "running" else mixupe["mean"]
  return methods.get_objective(
      method, num_classes=config.dataset.num_classes, alpha=m.alpha, beta=m.beta,
      lam_scope=m.lam_scope, pairing=m.pairing, point=m.point,
      label_smoothing=m.label_smoothing, loss=m.loss, cosine_dim=m.cosine_dim,
      interpolate=m.interpolate, amp=dict(config.amp), mixupe=mixupe,
      mesh=mesh if m.shard_local else None, axis_name=axis_name,
      image_shape=tuple(config.dataset.input_shape), cutmix_alpha=m.cutmix_alpha,
      switch_prob=m.switch_prob, apply_prob=m.apply_prob, cutmix_minmax=m.cutmix_minmax,
      correct_lam=m.correct_lam, bce_threshold=m.bce_threshold,
      k=m.k if methods.parse(method)[0] != "erm" else 2, largest_first=m.k_largest_first)


def sample_inputs(config: ConfigDict) -> jax.Array:
  """Zeros of one example, [1, *dataset.input_shape] (int32 token ids or float32)."""
  dtype = jnp.int32 if config.dataset.input_dtype == "int32" else jnp.float32
  return jnp.zeros((1,) + tuple(config.dataset.input_shape), dtype)


class Data:
  """This process's training iterator and eval batches.

  train: an iterator of {'inputs': [B/P, *input_shape], 'labels': int32[B/P]}
    (B the global batch, P the processes) with `.step` or `start_step` and
    `.close()`; train_examples: size of the training set; eval_batch: the
    global eval batch, rounded up to a multiple of the mesh size;
    `eval_batches()`: a fresh pass over the eval set (padded rows have mask 0);
    preprocess: `input_pipeline.device_normaliser(dataset.normalize)`, the
    step's half of the pipeline (uint8 images -> normalised f32; pass it as
    the train and eval steps' `preprocess`).
  """

  def __init__(self, train: Any, train_examples: int, eval_batch: int,
               eval_batches: Callable[[], Iterator[Batch]],
               preprocess: Callable[[Any], Any]):
    self.train = train
    self.train_examples = train_examples
    self.eval_batch = eval_batch
    self._eval_batches = eval_batches
    self.preprocess = preprocess

  def eval_batches(self) -> Iterator[Batch]:
    return self._eval_batches()


def data(config: ConfigDict, mesh: Mesh, start_step: int = 0) -> Data:
  """The `Data` of `config.dataset` for this process, the training batches from `start_step`.

  Raises ValueError when `dataset.input_shape` does not match the data (except
  with Inception crops, which resize).
  """
  d = config.dataset
  shape = tuple(d.input_shape)
  groups = sharding.num_batch_shards(mesh) if config.mix.shard_local else 1
  pidx, pcount = jax.process_index(), jax.process_count()
  eval_batch = -(-(config.eval_batch_size or config.batch_size) // mesh.size) * mesh.size
  preprocess = input_pipeline.device_normaliser(d.normalize)
  if d.name == "tfds" and d.input_dtype != "int32":
    train = input_pipeline.TfdsTrainIterator(
        d, config.batch_size, seed=config.seed, process_index=pidx, process_count=pcount,
        start_step=start_step)
    return Data(train, input_pipeline.tfds_num_examples(d, d.train_split), eval_batch,
                lambda: input_pipeline.tfds_eval_batches(
                    d, eval_batch, process_index=pidx, process_count=pcount), preprocess)
  arrays = input_pipeline.load_arrays(d, seed=config.seed)
  got = tuple(arrays["train"].get(np.arange(1))[0].shape[1:])
  if d.augment != "inception" and got != shape:
    raise ValueError(f"config.dataset.input_shape={shape} but dataset {d.name!r} has "
                     f"examples of shape {got}.")
  train = input_pipeline.TrainIterator(
      arrays["train"], config.batch_size, seed=config.seed, augment=d.augment,
      out_shape=shape, normalize=d.normalize, process_index=pidx, process_count=pcount,
      epoch_pairing=d.epoch_pairing, num_groups=groups, start_step=start_step,
      prefetch=d.prefetch)
  return Data(train, len(arrays["train"]), eval_batch,
              lambda: input_pipeline.eval_batches(
                  arrays["eval"], eval_batch, augment=d.augment, out_shape=shape,
                  normalize=d.normalize, process_index=pidx, process_count=pcount), preprocess)


def total_steps(config: ConfigDict, train_examples: int) -> tuple[int, float]:
  """(total steps, steps per epoch) from `config.total_steps` or `config.num_epochs`."""
  per_epoch = train_examples / config.batch_size
  steps = config.total_steps or int(math.ceil(config.num_epochs * per_epoch))
  return steps, per_epoch


def check_before_data(config: ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError for what `config` and the devices decide alone, before data loads.

  The global batch must split evenly over the mesh's devices, and a
  warmup_cosine warm-up must be shorter than the run when both lengths are
  known without the data (total_steps, or num_epochs with synthetic data).
  """
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes; use a multiple of {jax.process_count()}.")
  shards = sharding.num_batch_shards(mesh)
  if config.batch_size % shards:
    fit = -(-config.batch_size // shards) * shards
    raise ValueError(
        f"config.batch_size={config.batch_size} is split over {shards} devices "
        f"(config.mesh_data={config.mesh_data}, config.mesh_fsdp={config.mesh_fsdp}, "
        f"{jax.device_count()} devices) and must be a multiple of {shards}: use e.g. "
        f"--config.batch_size={fit}, or fewer devices with --config.mesh_data.")
  examples = config.dataset.train_examples if config.dataset.name == "synthetic" else 0
  per_epoch = examples / config.batch_size if examples else None
  steps = total_steps(config, examples)[0] if examples else config.total_steps
  if steps and (config.schedule.warmup_steps or per_epoch):
    optim.make_schedule(config, steps, per_epoch or 1.0)  # Raises for a warm-up >= steps.


def check_labels(config: ConfigDict, data: Data) -> None:
  """Raises ValueError if the training labels fall outside [0, config.dataset.num_classes).

  Checked for in-memory datasets (TFDS streams are not scanned).
  """
  labels = getattr(getattr(data.train, "dataset", None), "labels", None)
  if labels is None or not len(labels):
    return
  lo, hi, n = int(np.min(labels)), int(np.max(labels)), config.dataset.num_classes
  if lo < 0 or hi >= n:
    data.train.close()
    raise ValueError(f"config.dataset.num_classes={n} but the training labels of dataset "
                     f"{config.dataset.name!r} span [{lo}, {hi}]; set "
                     f"config.dataset.num_classes to at least {hi + 1} (labels must be "
                     "0..num_classes-1).")
