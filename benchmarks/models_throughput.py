"""Training throughput and model FLOPs utilisation (MFU) of the model zoo.

  python benchmarks/models_throughput.py --models resnet50,vit_b16,coatnet0 --batch 256
  python benchmarks/models_throughput.py --models resnet18 --batch 2 --image-size 32 --steps 2

One ERM train step (softmax cross-entropy, SGD with momentum, batch-norm
statistics updated) on synthetic data, data-parallel over all local devices
(batch sharded, parameters replicated), compute in `--dtype` (default
bfloat16) with float32 parameters. Per model it prints the median step time
over `--steps` timed steps after one warm-up, examples/s, the forward FLOPs
per example and the train step's model FLOPs (3x forward, XLA's count), the
achieved TFLOP/s and MFU = model FLOP/s / peak. The peak is
`--peak-tflops` per device, or looked up from the device kind (dense bf16
tensor-core figures; none for CPUs, where MFU is left blank).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import adapters, models, objectives

# Dense bf16 peak TFLOP/s per device, matched by substring of `device_kind` (lower case).
PEAK_TFLOPS = (
    ("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("a100", 312.0), ("l4", 121.0),
    ("a10g", 70.0), ("v100", 125.0), ("tpu v6", 918.0), ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v4", 275.0), ("tpu v3", 123.0),
)


def peak_tflops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak of a device kind, or None when unknown (e.g. CPUs)."""
  kind = device_kind.lower()
  for key, value in PEAK_TFLOPS:
    if key in kind:
      return value
  return None


def _flops(compiled: Any) -> Optional[float]:
  """XLA's FLOP count of a compiled computation (None if the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (some backends do not implement it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def input_shape(name: str, image_size: Optional[int]) -> tuple[tuple[int, ...], Any]:
  """One example's shape and dtype: the registry's, with `image_size` for image models."""
  spec = models.model_spec(name)
  shape = tuple(spec.input_shape)
  if image_size and len(shape) == 3:
    shape = (image_size, image_size, shape[-1])
  return shape, spec.input_dtype


def make_inputs(key: jax.Array, batch: int, shape: tuple[int, ...], dtype: Any, classes: int):
  kx, ky = jax.random.split(key)
  if jnp.issubdtype(dtype, jnp.integer):
    x = jax.random.randint(kx, (batch,) + shape, 1, 1000, jnp.int32)
  else:
    x = jax.random.normal(kx, (batch,) + shape, jnp.float32)
  return x, jax.random.randint(ky, (batch,), 0, classes)


def bench_model(name: str, batch: int, image_size: Optional[int], dtype: Any, steps: int,
                num_classes: int, peak: Optional[float], mesh: Mesh) -> dict[str, Any]:
  """Times the ERM train step of model `name`; returns one table row as a dict."""
  kwargs = {} if name == "gan_generator" else {"num_classes": num_classes}
  model = models.get_model(name, dtype=dtype, **kwargs)
  shape, in_dtype = input_shape(name, image_size)
  x, y = make_inputs(jax.random.key(0), batch, shape, in_dtype, num_classes)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  x, y = jax.device_put(x, sharded), jax.device_put(y, sharded)
  variables = jax.jit(model.init, out_shardings=replicated)(
      {"params": jax.random.key(1), "dropout": jax.random.key(2)}, x[:1])
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  apply = adapters.make_apply(model, train=True)

  def apply_f32(v, inputs, **kw):
    out, new_state = apply(v, inputs, **kw)
    return out.astype(jnp.float32), new_state

  objective = objectives.erm(num_classes=num_classes)

  def step(params, state, opt_state, x, y, key):
    def loss_fn(p):
      loss, (new_state, _) = objective(apply_f32, {"params": p, **state}, x, y, key)
      return loss, new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  args = (params, state, opt_state, x, y, jax.random.key(3))
  step_c = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args).compile()

  def forward(v, x):
    return model.apply(v, x, train=False)

  fwd_c = jax.jit(forward).lower(variables, x).compile()
  fwd_flops = _flops(fwd_c)
  step_flops = _flops(step_c)

  params, state, opt_state, loss = step_c(*args)  # Warm-up.
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    params, state, opt_state, loss = step_c(params, state, opt_state, x, y, jax.random.key(4 + i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"{name}: the loss is {float(loss)} after {steps + 1} steps.")
  t = float(np.median(times))
  n_dev = mesh.size
  # XLA's counts are per device (SPMD program); the whole batch does n_dev times that.
  model_flops = 3.0 * fwd_flops * n_dev if fwd_flops is not None else None
  achieved = model_flops / t if model_flops is not None else None
  return {
      "model": name, "batch": batch, "input": "x".join(map(str, shape)),
      "dtype": jnp.dtype(dtype).name, "devices": n_dev, "step_ms": t * 1e3,
      "examples_per_s": batch / t,
      "fwd_gflops_per_example": fwd_flops * n_dev / batch / 1e9 if fwd_flops else None,
      "xla_step_gflops": step_flops * n_dev / 1e9 if step_flops else None,
      "model_tflops_per_s": achieved / 1e12 if achieved else None,
      "mfu": achieved / (peak * 1e12 * n_dev) if achieved and peak else None,
  }


def _fmt(v: Any, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="resnet50,vit_b16,coatnet0",
                  help=f"comma-separated names from: {', '.join(models.list_models())}")
  ap.add_argument("--batch", type=int, default=256, help="global batch (all devices)")
  ap.add_argument("--image-size", type=int, default=0,
                  help="square image size for image models (0: the model's paper size)")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  ap.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up)")
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--peak-tflops", type=float, default=0.0,
                  help="peak TFLOP/s per device for MFU (0: look up the device kind)")
  ap.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = ap.parse_args(argv)

  names = [n.strip() for n in args.models.split(",") if n.strip()]
  for n in names:
    models.model_spec(n)  # ValueError listing the known names.
  devices = jax.devices()
  if args.batch % len(devices):
    raise ValueError(f"--batch {args.batch} must be divisible by the {len(devices)} devices.")
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}.")
  mesh = Mesh(np.asarray(devices), ("data",))
  kind = devices[0].device_kind
  peak = args.peak_tflops or peak_tflops(kind)
  rows = [bench_model(n, args.batch, args.image_size or None, jnp.dtype(args.dtype), args.steps,
                      args.num_classes, peak, mesh) for n in names]

  print(f"device: {len(devices)} x {kind}  peak: {_fmt(peak, '.0f')} TFLOP/s per device  "
        f"dtype: {args.dtype}  batch: {args.batch}  ERM train step")
  print("| model | input | ms/step | examples/s | fwd GFLOP/example | XLA step GFLOP | "
        "model TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['input']} | {r['step_ms']:.2f} | {r['examples_per_s']:.1f} | "
          f"{_fmt(r['fwd_gflops_per_example'], '.4g')} | {_fmt(r['xla_step_gflops'], '.4g')} | "
          f"{_fmt(r['model_tflops_per_s'], '.2f')} | {_fmt(r['mfu'], '.1%')} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
