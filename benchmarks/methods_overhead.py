"""Step time of AMP and MixupE (and mixup) over the ERM step on the same model, in one run.

  python benchmarks/methods_overhead.py                      # small CNN on CPU
  python benchmarks/methods_overhead.py --model resnet50 --batch 256 --image-size 224 \\
      --dtype bfloat16                                       # on a GPU

Prints one table: per-step milliseconds (median of --steps timed steps after a
warm-up step; the methods take turns each round) and the ratio to ERM (of the
medians and of the minima), and the FLOPs of the compiled step by XLA's cost
analysis, for a full jitted train step (forward, backward, SGD update). Rows:
- mixup: Beta(1, 1) per example, input mixing.
- amp full / amp max: AMP (eps 0.002) at the input.
- amp @last hidden (split): AMP mixing at the last hidden state, with the model
  split into encode/head (`adapters.make_split_apply`): the encoder runs once.
- amp @last hidden (intercept): the same through `adapters.make_apply` and
  linen interception: every pass runs the whole model in the program (XLA may
  merge the identical encoder computations).
- mixupe concat / separate / rho=0.25: MixupE (q^) with the clean pass batched
  into the mixed pass, as a separate pass, and on a quarter of the batch.
- mixupe exact / exact separate: MixupE's exact q (a JVP along the batch mean
  minus each example) with the default clean pass and with a separate one.
- amp + mixupe: both.
For models from `mixjax.models` the last-hidden rows need `encode`/`head`
methods and `--point` (the submodule whose output is the last hidden state);
they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import adapters, amp, mixupe, objectives, policies


class Features(nn.Module):
  """Two conv / batch-norm / ReLU / max-pool stages, then global average pooling."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, f in enumerate((32, 64)):
      x = nn.Conv(f, (3, 3), dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    return jnp.mean(x, axis=(1, 2))


class SmallCNN(nn.Module):
  """The small CNN of benchmarks/mixup_overhead.py, split at its last hidden state."""
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.features = Features(self.dtype)
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)

  def encode(self, x, train: bool = False):
    return self.features(x, train)

  def head(self, h, train: bool = False):
    return self.classifier(h)

  def __call__(self, x, train: bool = False):
    return self.head(self.encode(x, train), train)


def _model(name: str, num_classes: int, dtype, width=None):
  if name == "small_cnn":
    return SmallCNN(num_classes, dtype), "features"
  from mixjax import models  # The model zoo.
  extra = {} if width is None else {"width": width}
  return models.get_model(name, num_classes=num_classes, dtype=dtype, **extra), None


def _time_interleaved(fns, args, steps):
  """Per function: step times over `steps` rounds, the functions taking turns in each round.

  Taking turns spreads any slowdown of a shared machine over all methods alike.
  """
  for fn in fns:  # Compile and warm up.
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(steps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [np.asarray(t) for t in times]


def make_step(apply, objective, tx):
  @jax.jit
  def step(params, model_state, opt_state, x, y, key):
    def loss_fn(p):
      loss, (new_state, _) = objective(apply, {"params": p, **model_state}, x, y, key)
      return loss, new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss
  return step


def _flops(step, args) -> float:
  """FLOPs of one compiled step by XLA's cost analysis (nan where unavailable)."""
  try:
    cost = step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))
  except Exception:  # noqa: BLE001  (cost analysis is backend-dependent)
    return float("nan")


def methods(num_classes: int, point, split_ok: bool):
  """(name, objective, which apply: 'whole' or 'split')."""
  mix = objectives.mixup(policies.mixup(1.0), num_classes=num_classes)
  rows = [
      ("erm", objectives.erm(num_classes=num_classes), "whole"),
      ("mixup", mix, "whole"),
      ("amp full", amp.amp(mix), "whole"),
      ("amp max", amp.amp(mix, mode="max"), "whole"),
  ]
  if point is not None:
    hidden = amp.amp(objectives.mixup(policies.mixup(1.0), num_classes=num_classes, point=point))
    if split_ok:
      rows.append(("amp @last hidden (split)", hidden, "split"))
    rows.append(("amp @last hidden (intercept)", hidden, "whole"))
  rows += [
      ("mixupe concat", mixupe.mixupe(mix), "whole"),
      ("mixupe separate", mixupe.mixupe(mix, clean_pass="separate"), "whole"),
      ("mixupe rho=0.25", mixupe.mixupe(mix, rho=0.25), "whole"),
      ("mixupe exact", mixupe.mixupe(mix, exact=True, mean="batch"), "whole"),
      ("mixupe exact separate", mixupe.mixupe(mix, exact=True, mean="batch",
                                              clean_pass="separate"), "whole"),
      ("amp + mixupe", mixupe.mixupe(amp.amp(mix)), "whole"),
  ]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="small_cnn")
  ap.add_argument("--point", default=None,
                  help="submodule path of the last hidden state (default: 'features' for "
                       "small_cnn; rows skipped when unknown)")
  ap.add_argument("--width", type=int, default=None, help="zoo models: width override")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=20,
                  help="timed steps per method (0: XLA FLOPs only, no timing)")
  ap.add_argument("--only", default="", help="comma-separated subset of method names")
  args = ap.parse_args(argv)
  dtype = jnp.dtype(args.dtype)

  model, default_point = _model(args.model, args.num_classes, dtype, args.width)
  point = args.point or default_point
  split_ok = all(callable(getattr(model, m, None)) for m in ("encode", "head"))
  x = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3), dtype)
  y = jax.random.randint(jax.random.key(1), (args.batch,), 0, args.num_classes)
  variables = model.init(jax.random.key(2), x[:2])
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(params)
  applies = {"whole": adapters.make_apply(model, train=True)}
  if split_ok and point is not None:
    applies["split"] = adapters.make_split_apply(model, point=point)

  only = {s.strip() for s in args.only.split(",") if s.strip()}
  rows = methods(args.num_classes, point, split_ok)
  unknown = only - {name for name, _, _ in rows}
  if unknown:
    ap.error(f"--only {sorted(unknown)}: choose from {[name for name, _, _ in rows]}")
  names, steps = [], []
  for name, obj, which in rows:
    if only and name not in only and name != "erm":
      continue
    names.append(name)
    steps.append(make_step(applies[which], obj, tx))
  step_args = (params, model_state, opt_state, x, y, jax.random.key(3))
  flops = [_flops(step, step_args) for step in steps]
  if args.steps > 0:
    times = _time_interleaved(steps, step_args, args.steps)
  else:
    times = [np.full(1, np.nan) for _ in steps]
  med = [float(np.median(t)) for t in times]
  low = [float(np.min(t)) for t in times]
  print(f"device: {jax.devices()[0].device_kind}  model: {args.model}  batch: {args.batch}  "
        f"image: {args.image_size}  dtype: {args.dtype}  steps: {args.steps}")
  print("| method | ms/step (median) | ratio to ERM (median) | ratio to ERM (min) "
        "| XLA GFLOP/step | FLOP ratio |")
  print("|---|---|---|---|---|---|")
  for name, m, lo, f in zip(names, med, low, flops):
    print(f"| {name} | {m * 1e3:.2f} | {m / med[0]:.3f} | {lo / low[0]:.3f} "
          f"| {f / 1e9:.3f} | {f / flops[0]:.3f} |")


if __name__ == "__main__":
  main()
