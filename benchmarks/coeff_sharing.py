"""The cost of each coefficient-sharing scope in the compiled sharded train step.

  python benchmarks/coeff_sharing.py                          # ResNet-18, 32 px, batch 128
  python benchmarks/coeff_sharing.py --model digits_cnn --image-size 8 --batch 16

Compiles the mixup train step with the batch split over 8 simulated CPU
devices (`--devices`; set before JAX starts when run as a script) and
shard-local mixing, once per scope: one lam per batch, per host (process),
per device, per example and per pair (i, B-1-i). Prints one table of XLA's
cost analysis of the compiled step (FLOPs and bytes accessed, per device)
as ratios to ERM and to per-batch mixup, and the number of collectives in
the optimized HLO (all-reduce, all-gather, all-to-all, collective-permute).
Nothing is timed: the figures are the compiled program's.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
  _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from mixjax import adapters, methods, models  # noqa: E402
from mixjax import train_step as ts  # noqa: E402

COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(")
# Row name -> (method, lam_scope, pairing).
ROWS = {
    "erm": ("erm", "example", "random"),
    "per batch": ("mixup", "batch", "random"),
    "per host": ("mixup", "host", "random"),
    "per device": ("mixup", "device", "random"),
    "per example": ("mixup", "example", "random"),
    "per pair": ("mixup", "pair", "reverse"),
}


def compiled_cost(model, mesh: Mesh, method: str, lam_scope: str, pairing: str, batch: int,
                  size: int, num_classes: int) -> tuple[float, float, int]:
  """(FLOPs, bytes accessed, collectives) of the compiled sharded train step."""
  x = jnp.zeros((batch, size, size, 3), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  obj = methods.get_objective(method, num_classes=num_classes, alpha=0.2, lam_scope=lam_scope,
                              pairing=pairing, mesh=mesh, axis_name="data")
  tx = optax.sgd(0.1, 0.9)

  def init():
    v = ts.init_variables(model, jax.random.key(0), x[:1])
    return ts.create_train_state({**v, **obj.init(x[:1])}, tx, jax.random.key(1), ema=False)

  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(functools.partial(ts.train_step, objective=obj,
                                   apply=adapters.make_apply(model, train=True), tx=tx),
                 in_shardings=(rep, shard), out_shardings=(rep, rep))
  compiled = step.lower(jax.eval_shape(init), {"inputs": x, "labels": y}).compile()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  collectives = len(COLLECTIVE.findall(compiled.as_text()))
  return float(cost.get("flops", np.nan)), float(cost.get("bytes accessed", np.nan)), collectives


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet18")
  ap.add_argument("--batch", type=int, default=128, help="global batch")
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--devices", type=int, default=8)
  args = ap.parse_args(argv)
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"{args.devices} devices needed, {len(jax.devices())} found: run as a "
                     "script, or set XLA_FLAGS=--xla_force_host_platform_device_count.")
  mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",))
  model = models.get_model(args.model, num_classes=args.num_classes)
  costs = {name: compiled_cost(model, mesh, *row, args.batch, args.image_size, args.num_classes)
           for name, row in ROWS.items()}
  erm, per_batch = costs["erm"], costs["per batch"]
  print(f"device: {jax.devices()[0].device_kind} x {args.devices}  model: {args.model}  "
        f"global batch: {args.batch}  image: {args.image_size}")
  print("| scope | FLOPs / ERM | bytes / ERM | FLOPs / per batch | bytes / per batch | "
        "collectives |\n|---|---|---|---|---|---|")
  for name, (flops, nbytes, coll) in costs.items():
    print(f"| {name} | {flops / erm[0]:.4f} | {nbytes / erm[1]:.4f} | "
          f"{flops / per_batch[0]:.4f} | {nbytes / per_batch[1]:.4f} | {coll} |")
  print(f"ERM step per device: {erm[0] / 1e9:.4g} GFLOPs, {erm[1] / 1e6:.4g} MB accessed")


if __name__ == "__main__":
  main()
