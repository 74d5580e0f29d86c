"""Time of a mixup train step over the ERM step on the same model, and the mixing op's bandwidth.

  python benchmarks/mixup_overhead.py                    # small CNN on CPU
  python benchmarks/mixup_overhead.py --model resnet50 --batch 256 --image-size 224 --dtype bfloat16

Prints one table: per-step milliseconds (median of --steps timed steps after
warm-up) and the ratio to ERM, then the mixing op alone in GB/s, counting
2 reads (example and partner) and 1 write per element.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import adapters, objectives, policies


class SmallCNN(nn.Module):
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, f in enumerate((32, 64)):
      x = nn.Conv(f, (3, 3), dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


def _model(name: str, num_classes: int, dtype):
  if name == "small_cnn":
    return SmallCNN(num_classes, dtype)
  from mixjax import models  # The model zoo.
  return models.get_model(name, num_classes=num_classes, dtype=dtype)


def _time(fn, args, steps):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def make_step(model, objective, tx):
  apply = adapters.make_apply(model, train=True)

  @jax.jit
  def step(params, model_state, opt_state, x, y, key):
    def loss_fn(p):
      loss, (new_state, _) = objective(apply, {"params": p, **model_state}, x, y, key)
      return loss, new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss
  return step


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="small_cnn")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args(argv)
  dtype = jnp.dtype(args.dtype)

  model = _model(args.model, args.num_classes, dtype)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3), dtype)
  y = jax.random.randint(jax.random.key(1), (args.batch,), 0, args.num_classes)
  variables = model.init(jax.random.key(2), x[:2])
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(params)

  methods = {
      "erm": objectives.erm(num_classes=args.num_classes),
      "mixup": objectives.mixup(policies.mixup(0.2), num_classes=args.num_classes),
      "mixup (per-batch lam)": objectives.mixup(policies.mixup(0.2, per_example=False),
                                                num_classes=args.num_classes),
  }
  # Steps of all methods are interleaved round by round, so a change in machine
  # load hits every method alike; each figure is the median over the rounds.
  args_ = (params, model_state, opt_state, x, y, jax.random.key(3))
  steps = {name: make_step(model, obj, tx) for name, obj in methods.items()}
  for fn in steps.values():
    jax.block_until_ready(fn(*args_))
  times = {name: [] for name in steps}
  for _ in range(args.steps):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args_))
      times[name].append(time.perf_counter() - t0)
  rows = [(name, float(np.median(t))) for name, t in times.items()]
  base = rows[0][1]
  print(f"device: {jax.devices()[0].device_kind}  model: {args.model}  batch: {args.batch}  "
        f"image: {args.image_size}  dtype: {args.dtype}")
  print(f"| method | ms/step | ratio to ERM |\n|---|---|---|")
  for name, t in rows:
    print(f"| {name} | {t * 1e3:.2f} | {t / base:.3f} |")

  lam = jax.random.uniform(jax.random.key(4), (args.batch,))
  perm = jax.random.permutation(jax.random.key(5), args.batch)
  mix = jax.jit(mixjax.mix_with_partner)
  t = _time(mix, (x, perm, lam), args.steps)
  gbs = 3 * x.size * x.dtype.itemsize / t / 1e9
  print(f"| mixing op alone | {t * 1e3:.3f} | {gbs:.1f} GB/s |")


if __name__ == "__main__":
  main()
