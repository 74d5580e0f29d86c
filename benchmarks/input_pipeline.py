"""Input-pipeline and train-step throughput.

    python benchmarks/input_pipeline.py [--size 224] [--batch 64] [--steps 5]

1. ImageNet-style augmentation (Inception crop + bilinear resize + flip) of
   the NumPy pipeline on synthetic uint8 images (out as uint8), one CPU core
   (this process, single-threaded NumPy): images/s per core. Also CIFAR
   pad-crop-flip at 32x32.
2. The TFDS path as `train.py` runs it for ImageNet (tf.data: read TFRecords,
   decode JPEG, Inception crop, flip, normalise, batch) on a JPEG dataset of
   `--tfds_images` photo-like images of 300-500 px written to a temporary
   folder, with a private tf.data thread pool of 1 thread: images/s per core
   (skipped without the `[data]` extra).
3. Train-step throughput on synthetic data for each method, as images/s and
   as a ratio to ERM (small CNN, or `--model NAME` from mixjax.models).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class SmallResNet(nn.Module):
  """Conv + BN stem, one residual block with BN, global pool, dense head (the default model)."""
  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def bench_augment(size: int, batch: int, repeats: int) -> list[tuple[str, float]]:
  from mixjax import input_pipeline as ip
  rng = np.random.default_rng(0)
  rows = []
  src = rng.integers(0, 256, (batch, int(size * 1.14), int(size * 1.14), 3), dtype=np.uint8)
  for name, x, kind, out in (
      (f"inception {src.shape[1]}->{size}", src, "inception", (size, size, 3)),
      ("cifar pad-crop-flip 32", rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8), "cifar",
       (32, 32, 3))):
    ip.augment_batch(x[:2], kind, rng, out)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
      ip.augment_batch(x, kind, rng, out)
    rows.append((name, batch * repeats / (time.perf_counter() - t)))
  return rows


def bench_tfds(size: int, batch: int, n_images: int, batches: int) -> list[tuple[str, float]]:
  """images/s of `TfdsTrainIterator` (ImageNet path) with one tf.data thread."""
  import tempfile
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError:
    return []
  from mixjax import config_utils
  from mixjax import input_pipeline as ip
  rng = np.random.default_rng(0)

  def photo():  # Smooth content (upsampled noise) compresses and decodes like a photo.
    h, w = (int(v) for v in rng.integers(300, 500, 2))
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    big = np.repeat(np.repeat(small, 16, 0), 16, 1)[:h, :w]
    return np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)

  images = [photo() for _ in range(n_images)]
  gen = lambda: ({"image": im, "label": i % 10} for i, im in enumerate(images))  # noqa: E731
  spec = {"image": tf.TensorSpec((None, None, 3), tf.uint8), "label": tf.TensorSpec((), tf.int64)}
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(encoding_format="jpeg"),
                                         "label": tfds.features.ClassLabel(num_classes=10)})
  with tempfile.TemporaryDirectory() as data_dir:
    splits = {k: tf.data.Dataset.from_generator(gen, output_signature=spec)
              for k in ("train", "validation")}
    tfds.dataset_builders.store_as_tfds_dataset(
        name="bench_jpeg", config="default", version="1.0.0", data_dir=data_dir,
        features=features, split_datasets=splits)
    d = config_utils.base_config().dataset
    d.update(dict(name="tfds", tfds_name="bench_jpeg", data_dir=data_dir,
                  input_shape=(size, size, 3), augment="inception", num_classes=10, prefetch=1,
                  eval_split="validation"))
    it = ip.TfdsTrainIterator(d, batch, seed=0, shuffle_buffer=256, threads=1)
    next(it)  # warm-up: graph building, file opening
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    ips = batch * batches / (time.perf_counter() - t)
  return [(f"tf.data JPEG 300-500px -> {size}", ips)]


def bench_steps(model_name: str, steps: int, batch: int, size: int) -> list[tuple[str, float]]:
  """images/s of the jitted, sharded train step (compile and 2 warm-up steps excluded)."""
  import functools

  import jax
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from mixjax import config_utils
  from mixjax import from_config
  from mixjax import adapters
  from mixjax import train_step as ts
  c = config_utils.base_config()
  c.dataset.input_shape = (size, size, 3)
  c.model.name = model_name or "digits_cnn"
  module = from_config.model(c, 10) if model_name else SmallResNet(num_classes=10, width=32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  batch_np = {"inputs": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
              "labels": rng.integers(0, 10, batch).astype(np.int32)}
  data = jax.device_put(batch_np, shard)
  tx = optax.sgd(0.1, 0.9)
  variables = ts.init_variables(module, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rows = []
  for method in ("erm", "mixup", "untied", "dat"):
    obj = from_config.objective(c, method, mesh)
    fresh = jax.tree_util.tree_map(lambda x: x.copy(), variables)  # the step donates its input
    state = jax.device_put(ts.create_train_state(fresh, tx, jax.random.key(1), ema=False), rep)
    step = jax.jit(functools.partial(ts.train_step, objective=obj,
                                     apply=adapters.make_apply(module), tx=tx),
                   in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)
    for _ in range(2):
      state, m = step(state, data)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, data)
    jax.block_until_ready(state)
    rows.append((method, batch * steps / (time.perf_counter() - t)))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--step_size", type=int, default=32, help="image size for the step benchmark")
  p.add_argument("--step_batch", type=int, default=64)
  p.add_argument("--tfds_images", type=int, default=512)
  p.add_argument("--tfds_batches", type=int, default=8)
  p.add_argument("--model", default="", help="mixjax.models name (default: a small CNN)")
  a = p.parse_args(argv)
  print(f"Augmentation, NumPy, 1 core (batch {a.batch}):")
  print(f"  {'pipeline':32s} {'images/s/core':>14s}")
  for name, ips in bench_augment(a.size, a.batch, a.repeats):
    print(f"  {name:32s} {ips:14.1f}")
  rows = bench_tfds(a.size, a.batch, a.tfds_images, a.tfds_batches)
  print(f"\nTFDS ImageNet path, tf.data with 1 thread (batch {a.batch}):")
  for name, ips in rows or [("skipped: pip install -e '.[data]'", float("nan"))]:
    print(f"  {name:32s} {ips:14.1f}")
  import jax
  print(f"\nTrain step on synthetic {a.step_size}x{a.step_size}x3, batch {a.step_batch}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"model {a.model or 'SmallResNet(width=32)'}:")
  rows = bench_steps(a.model, a.steps, a.step_batch, a.step_size)
  erm = rows[0][1]
  print(f"  {'method':10s} {'images/s':>10s} {'ratio to ERM':>13s}")
  for method, ips in rows:
    print(f"  {method:10s} {ips:10.1f} {ips / erm:13.2f}")


if __name__ == "__main__":
  main()
