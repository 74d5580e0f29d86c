"""The performance suite: one command, one Markdown table.

  python benchmarks/suite.py --device gpu   # bf16, batch 256, 224 px (one H100/H200)
  python benchmarks/suite.py --device cpu   # the same rows at tiny sizes (tests/test_benchmarks.py)

Rows (columns: library, reference, ratio = library / reference):
- `<model> img/s` and `<model> MFU %` for ResNet-50, ViT-B/16 and CoAtNet-0:
  the library's own train step (`mixjax.train_step.train_step`, ERM, zoo
  model from `mixjax.models.get_model`, SGD with momentum) next to a plain
  Flax step (value_and_grad + optax update + batch statistics) of the plain
  models in `benchmarks/reference_models.py` (ResNet-50, ViT-B/16; CoAtNet-0:
  the zoo module in the plain step), timed in turns in the same run. MFU uses
  the reference step's XLA FLOP count for both (model FLOPs; peak per device
  from `models_throughput.PEAK_TFLOPS` or `--peak-tflops`; blank on CPU).
- `<method> time / ERM` on ResNet-50: every method's library train step time
  over the ERM step's (library column), and XLA's FLOP ratio (reference column).
- `mixing op GB/s`: `mixing.mix_with_partner` on the image batch (reads it
  twice, writes it once) against a device-to-device copy of the same bytes
  (read once, written once); GB/s counts those nominal bytes.
- `<model> GFLOP/step`, `<model> MB accessed/step`, `<model> fusions`: XLA's
  cost analysis of the two compiled steps (deterministic; no device needed).
Times are medians over `--steps` timed steps after one warm-up step each.

`--cost-only` compiles the two steps of each model at the device's sizes on
whatever backend JAX has (abstract arguments: nothing is initialised or run)
and prints only the cost rows and each step's compile time (the second of two
compiles of each, in turns), e.g.
`--device gpu --cost-only` on a CPU host for the GPU suite's batch 256, 224 px.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import adapters, amp, mixing, mixupe, models, objectives, policies
from mixjax import train_step as train_step_lib

try:  # From the repository root (tests: pyproject's pythonpath).
  from benchmarks import models_throughput, reference_models
except ImportError:  # As a script: this folder is on sys.path.
  import models_throughput  # type: ignore[no-redef]
  import reference_models  # type: ignore[no-redef]

# Per device: sizes, dtype and model overrides (CPU: tiny graphs of the same shape).
SETTINGS = {
    "gpu": dict(batch=256, image=224, dtype="bfloat16", steps=20, num_classes=1000,
                resnet={}, vit={}, coatnet={}),
    "cpu": dict(batch=4, image=32, dtype="float32", steps=2, num_classes=10,
                resnet=dict(width=4, stage_sizes=(1, 1, 1, 1)),
                vit=dict(patch_size=8, hidden_size=32, depth=1, num_heads=2, mlp_dim=64),
                coatnet=dict(num_blocks=(1, 1, 1, 1, 1), channels=(8, 8, 8, 32, 32))),
}
MODELS = ("resnet50", "vit_b16", "coatnet0")


def _models(name: str, s: dict[str, Any], dtype) -> tuple[Any, Any]:
  """(zoo model, plain reference model) of `name` at the settings `s`."""
  nc = s["num_classes"]
  if name == "resnet50":
    o = s["resnet"]
    return (models.get_model("resnet50", num_classes=nc, dtype=dtype, **o),
            reference_models.ResNet50(nc, dtype=dtype, **o))
  if name == "vit_b16":
    o = s["vit"]
    return (models.get_model("vit_b16", num_classes=nc, dtype=dtype, **o),
            reference_models.ViT(num_classes=nc, dtype=dtype, **o))
  zoo = models.get_model(name, num_classes=nc, dtype=dtype, **s["coatnet"])
  return zoo, zoo  # No separate plain CoAtNet: the zoo module in the plain step.


def library_step(model, objective, tx, x, y, apply=None) -> tuple[Callable, tuple]:
  """The jitted library train step (state donated) and its arguments."""
  variables = model.init(jax.random.key(0), x, train=False)
  state = train_step_lib.create_train_state(variables, tx, jax.random.key(1), ema=False)
  step = functools.partial(train_step_lib.train_step, objective=objective,
                           apply=apply or adapters.make_apply(model), tx=tx)
  return step, (state, {"inputs": x, "labels": y})


def reference_step(model, tx, x, y) -> tuple[Callable, tuple]:
  """The plain value_and_grad + optax step and its arguments."""
  params, stats = reference_models.init(model, x)
  return reference_models.make_step(model, tx), (params, stats, tx.init(params), x, y)


class Timed:
  """A step compiled once (donating its state) and run on its own outputs."""

  def __init__(self, fn: Callable, args: tuple, state_args: int):
    self.cost = reference_models.cost(fn, *args)
    self.fn = jax.jit(fn, donate_argnums=tuple(range(state_args)))
    self.args, self.state_args = jax.tree_util.tree_map(jnp.copy, args), state_args
    self.times: list[float] = []

  def run(self, record: bool) -> None:
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.fn(*self.args))
    if record:
      self.times.append(time.perf_counter() - t0)
    self.args = tuple(out[:self.state_args]) + self.args[self.state_args:]

  @property
  def median(self) -> float:
    return float(np.median(self.times))


def time_in_turns(timed: list[Timed], steps: int) -> None:
  """One warm-up run each, then `steps` rounds in which each takes a turn."""
  for t in timed:
    t.run(record=False)
  for _ in range(steps):
    for t in timed:
      t.run(record=True)


def _library(model, objective, tx, x, y, apply=None) -> Timed:
  fn, args = library_step(model, objective, tx, x, y, apply)
  # train_step returns (state, metrics): keep the state for the next step.
  return Timed(lambda state, batch: (fn(state, batch)[0],), args, 1)


def _reference(model, tx, x, y) -> Timed:
  fn, args = reference_step(model, tx, x, y)
  return Timed(lambda p, s, o, x, y: fn(p, s, o, x, y)[:3], args, 3)


def cost_rows(device: str, batch: Optional[int] = None, model_names: tuple[str, ...] = MODELS,
              dtype: Optional[str] = None) -> list[tuple[str, float, float]]:
  """The cost rows of each model's library and reference ERM steps, compiled but not run.

  Arguments are abstract (`jax.ShapeDtypeStruct`): no parameter is
  initialised and no step runs, so the GPU suite's sizes compile on a CPU.
  """
  s = dict(SETTINGS[device])
  b = batch or s["batch"]
  dtype = jnp.dtype(dtype or s["dtype"])
  x = jax.ShapeDtypeStruct((b, s["image"], s["image"], 3), dtype)
  y = jax.ShapeDtypeStruct((b,), jnp.int32)
  tx = optax.sgd(0.1, momentum=0.9)
  rows: list[tuple[str, float, float]] = []
  for name in model_names:
    zoo, plain = _models(name, s, dtype)
    variables = jax.eval_shape(functools.partial(zoo.init, train=False), jax.random.key(0), x)
    state = jax.eval_shape(lambda v: train_step_lib.create_train_state(
        v, tx, jax.random.key(1), ema=False), variables)
    step = functools.partial(train_step_lib.train_step, apply=adapters.make_apply(zoo), tx=tx,
                             objective=objectives.erm(num_classes=s["num_classes"]))
    # Each compiled twice, in turns; the second compile times are reported (a model's
    # first compile in a process is slower, whichever step it is).
    for _ in range(2):
      lib = reference_models.cost(lambda st, bt: step(st, bt)[0], state,
                                  {"inputs": x, "labels": y})
      ref = _plain_cost(plain, tx, x, y)
    rows.append((f"{name} GFLOP/step", lib["flops"] / 1e9, ref["flops"] / 1e9))
    rows.append((f"{name} MB accessed/step", lib["bytes"] / 1e6, ref["bytes"] / 1e6))
    rows.append((f"{name} fusions", lib["fusions"], ref["fusions"]))
    rows.append((f"{name} compile s", lib["compile_s"], ref["compile_s"]))
    if plain is not zoo:  # The train step's own overhead: the zoo model in the plain step too.
      same = _plain_cost(zoo, tx, x, y)
      rows.append((f"{name} MB accessed/step, zoo model in both", lib["bytes"] / 1e6,
                   same["bytes"] / 1e6))
      rows.append((f"{name} fusions, zoo model in both", lib["fusions"], same["fusions"]))
  return rows


def _plain_cost(model, tx, x, y) -> dict[str, float]:
  """`reference_models.cost` of the plain step of `model` on abstract arguments."""
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  params, stats = variables["params"], variables.get("batch_stats", {})
  fn = reference_models.make_step(model, tx)
  return reference_models.cost(lambda p, st, o, xx, yy: fn(p, st, o, xx, yy)[:3], params, stats,
                               jax.eval_shape(tx.init, params), x, y)


def methods(num_classes: int) -> list[tuple[str, Any]]:
  """(name, objective) of every method, ERM first."""
  mix = objectives.mixup(policies.mixup(1.0), num_classes=num_classes)
  return [("erm", objectives.erm(num_classes=num_classes)), ("mixup", mix),
          ("amp full", amp.amp(mix)), ("amp max", amp.amp(mix, mode="max")),
          ("mixupe", mixupe.mixupe(mix)), ("mixupe rho=0.25", mixupe.mixupe(mix, rho=0.25))]


def mixing_bandwidth(x: jax.Array, steps: int) -> tuple[float, float]:
  """(GB/s of mix_with_partner, GB/s of a copy) of `x`, nominal bytes moved per second."""
  b = x.shape[0]
  perm = jax.random.permutation(jax.random.key(0), b)
  lam = jax.random.uniform(jax.random.key(1), (b,))
  mix = jax.jit(lambda x, perm, lam: mixing.mix_with_partner(x, perm, lam))
  copy = jax.jit(lambda x: jnp.copy(x))
  fns = [(mix, (x, perm, lam), 3 * x.nbytes), (copy, (x,), 2 * x.nbytes)]
  out = []
  for fn, args, _ in fns:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(max(steps, 5)):
    for i, (fn, args, _) in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  for (_, _, nbytes), t in zip(fns, times):
    out.append(nbytes / float(np.median(t)) / 1e9)
  return out[0], out[1]


def run(device: str, steps: Optional[int] = None, peak_tflops: Optional[float] = None,
        batch: Optional[int] = None, model_names: tuple[str, ...] = MODELS,
        method_names: Optional[tuple[str, ...]] = None, dtype: Optional[str] = None
        ) -> list[tuple[str, float, float]]:
  """The table's rows (name, library, reference) on the default backend at `device`'s sizes."""
  s = dict(SETTINGS[device])
  steps = steps or s["steps"]
  b = batch or s["batch"]
  dtype = jnp.dtype(dtype or s["dtype"])
  x = jax.random.normal(jax.random.key(0), (b, s["image"], s["image"], 3), dtype)
  y = jax.random.randint(jax.random.key(1), (b,), 0, s["num_classes"])
  tx = optax.sgd(0.1, momentum=0.9)
  peak = peak_tflops or models_throughput.peak_tflops(jax.devices()[0].device_kind)
  rows: list[tuple[str, float, float]] = []
  erm_resnet = None
  names = ("resnet50",) + tuple(n for n in model_names if n != "resnet50")
  for name in names:
    zoo, plain = _models(name, s, dtype)
    lib = _library(zoo, objectives.erm(num_classes=s["num_classes"]), tx, x, y)
    if name not in model_names:  # ResNet-50 only for the methods' rows.
      erm_resnet = (zoo, lib)
      continue
    ref = _reference(plain, tx, x, y)
    time_in_turns([lib, ref], steps)
    flops = ref.cost["flops"]
    rows.append((f"{name} img/s", b / lib.median, b / ref.median))
    mfu = [flops / t.median / (peak * 1e12) * 100 if peak else float("nan") for t in (lib, ref)]
    rows.append((f"{name} MFU %", *mfu))
    rows.append((f"{name} GFLOP/step", lib.cost["flops"] / 1e9, ref.cost["flops"] / 1e9))
    rows.append((f"{name} MB accessed/step", lib.cost["bytes"] / 1e6, ref.cost["bytes"] / 1e6))
    rows.append((f"{name} fusions", lib.cost["fusions"], ref.cost["fusions"]))
    if name == "resnet50":
      erm_resnet = (zoo, lib)
    else:
      del lib, ref
  zoo, erm = erm_resnet
  chosen = [(n, o) for n, o in methods(s["num_classes"])[1:]
            if method_names is None or n in method_names]
  timed = [erm] + [_library(zoo, obj, tx, x, y) for _, obj in chosen]
  erm.times = []
  time_in_turns(timed, steps)
  for (name, _), t in zip(chosen, timed[1:]):
    rows.append((f"{name} time / ERM", t.median / erm.median,
                 t.cost["flops"] / erm.cost["flops"]))
  rows.append(("mixing op GB/s", *mixing_bandwidth(x, steps)))
  return rows


def table(rows: list[tuple[str, float, float]], header: str) -> str:
  """The rows as one Markdown table."""
  lines = [header, "", "| row | library | reference | ratio |", "|---|---|---|---|"]
  for name, lib, ref in rows:
    fmt = (lambda v: "" if not np.isfinite(v) else f"{v:,.4g}")  # noqa: E731
    ratio = lib / ref if np.isfinite(lib) and np.isfinite(ref) and ref else float("nan")
    lines.append(f"| {name} | {fmt(lib)} | {fmt(ref)} | {fmt(ratio)} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--device", choices=sorted(SETTINGS), required=True,
                  help="'gpu': bf16, batch 256, 224 px; 'cpu': tiny sizes of the same rows")
  ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per device)")
  ap.add_argument("--batch", type=int, default=None, help="override the device's batch size")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="peak dense TFLOP/s per device for MFU (default: by device kind)")
  ap.add_argument("--models", default=",".join(MODELS),
                  help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="override the device's compute dtype (XLA:CPU handles bfloat16 by "
                       "converting, so CPU cost rows are closest to a GPU's in float32)")
  ap.add_argument("--cost-only", action="store_true",
                  help="compile the models' steps at the device's sizes on any backend and print "
                       "only XLA's cost rows and compile times (nothing runs)")
  ap.add_argument("--methods", default=None,
                  help="comma-separated subset of the methods' rows (default: all)")
  args = ap.parse_args(argv)
  model_names = tuple(m.strip() for m in args.models.split(",") if m.strip())
  all_methods = [n for n, _ in methods(10)[1:]]
  method_names = (None if args.methods is None else
                  tuple(m.strip() for m in args.methods.split(",") if m.strip()))
  if set(model_names) - set(MODELS):
    ap.error(f"--models {sorted(set(model_names) - set(MODELS))}: choose from {list(MODELS)}")
  if method_names is not None and set(method_names) - set(all_methods):
    ap.error(f"--methods {sorted(set(method_names) - set(all_methods))}: choose from "
             f"{all_methods}")
  backend = jax.default_backend()
  if args.device == "gpu" and backend != "gpu" and not args.cost_only:
    ap.error(f"--device gpu needs a GPU backend; JAX runs on {backend!r}. Use --device cpu.")
  t0 = time.perf_counter()
  if args.cost_only:
    rows = cost_rows(args.device, args.batch, model_names, args.dtype)
  else:
    rows = run(args.device, args.steps, args.peak_tflops, args.batch, model_names, method_names,
               args.dtype)
  s = SETTINGS[args.device]
  header = (f"{'cost only, ' if args.cost_only else ''}sizes: --device {args.device}  "
            f"device: {jax.devices()[0].device_kind}  batch: {args.batch or s['batch']}  "
            f"image: {s['image']}  dtype: {args.dtype or s['dtype']}  wall: {time.perf_counter() - t0:.0f} s")
  print(table(rows, header))


if __name__ == "__main__":
  main()
