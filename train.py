"""Trains a model with ERM or a mixup-family method: the one entry point.

    python train.py                      # configs/digits.py: mixup and ERM on digits, CPU
    python train.py --config configs/cifar10_preactresnet18.py --workdir /tmp/c10 \
        --config.method=untied+amp --config.mix.alpha=2.2
    python train.py --config configs/imagenet_resnet50.py:res=64 --workdir w \
        --config.dataset.name=synthetic

`--config path.py[:arg]` loads `get_config(arg)` from a config file;
`--config.key=value` overrides any field (unknown keys and bad values fail
before anything compiles). With `--workdir`, checkpoints (orbax, async,
keep-last-k) go to `<workdir>/checkpoints` and metrics to
`<workdir>/metrics.jsonl`, `train.csv`, `eval.csv` and `tb/` (TensorBoard);
an existing checkpoint there is resumed exactly (params, optimizer, EMA,
step, PRNG, data position). SIGTERM saves a checkpoint and exits cleanly.
`config.method='mixup,erm'` trains each method in turn (in `<workdir>/<method>`).
Multi-host: pass `--coordinator_address host:port --num_processes N
--process_id i` (or set MIXJAX_DISTRIBUTED=1 to let
`jax.distributed.initialize()` detect the cluster).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import adapters
from mixjax import checkpointing
from mixjax import config_utils
from mixjax import from_config
from mixjax import input_pipeline
from mixjax import metrics_writer
from mixjax import objectives as objectives_lib
from mixjax import optim
from mixjax import sharding
from mixjax import train_step as ts

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")


class _Preemption:
  """Records SIGTERM so the loop can save and exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # Not in the main thread: no signal handling.
      self._previous = None

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _f32_outputs(apply: adapters.ApplyFn) -> adapters.ApplyFn:
  """Casts model outputs to float32 (bf16 compute; losses and metrics in f32)."""
  def wrapped(variables, inputs, **kwargs):
    out, state = apply(variables, inputs, **kwargs)
    return jax.tree_util.tree_map(lambda o: o.astype(jnp.float32), out), state
  return wrapped


def create_train_state(config: ml_collections.ConfigDict, module: Any,
                       objective: objectives_lib.Objective, tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[ts.TrainState, Any]:
  """(the initial `TrainState` laid out on `mesh`, its shardings), from `config.seed`.

  The model's variables, the objective's extra collections (`objective.init`)
  and the optimizer state are created directly in their shardings (FSDP:
  split over 'fsdp'), never gathered on one device.
  """
  sample = from_config.sample_inputs(config)
  k_init, k_run = jax.random.split(jax.random.key(config.seed))

  def init():
    variables = ts.init_variables(module, k_init, sample)
    variables = {**variables, **objective.init(sample.astype(jnp.float32))}
    return ts.create_train_state(variables, tx, k_run, ema=config.ema_decay > 0)

  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init))
  return jax.jit(init, out_shardings=state_sharding)(), state_sharding


# Config keys that may change between a run and its resumption (logging, checkpoint
# cadence, where the data live); any other change needs allow_config_change.
RESUME_FREE_KEYS = ("method", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                    "keep_checkpoints", "progress_bar", "eval_batch_size", "dataset.prefetch",
                    "dataset.data_dir")


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_json(v, f"{prefix}{k}."))
  return out


def config_changes(saved_json: str, config: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> now' for each config key (outside RESUME_FREE_KEYS) that differs."""
  saved, now = _flat_json(json.loads(saved_json)), _flat_json(json.loads(config.to_json()))
  missing = "<absent>"
  return [f"{k}: {saved.get(k, missing)!r} -> {now.get(k, missing)!r}"
          for k in sorted(set(saved) | set(now))
          if k not in RESUME_FREE_KEYS and saved.get(k, missing) != now.get(k, missing)]


def restore_checkpoint(ckpt: checkpointing.Checkpointer, state: ts.TrainState, method: str,
                       workdir: str, config: Optional[ml_collections.ConfigDict] = None,
                       allow_config_change: bool = False) -> tuple[ts.TrainState, int]:
  """(state, step) of the latest readable checkpoint in `ckpt`, or (`state`, 0) if none.

  Raises ValueError when the checkpoint is of another method, of another
  model (`checkpointing.IncompatibleCheckpointError`, naming the first
  differing leaf), its data position is not its step, or it was written with
  another `config` (naming the keys; `allow_config_change=True` resumes anyway).
  """
  restored = ckpt.restore_latest(state)
  if restored is None:
    return state, 0
  state, meta = restored
  start = int(state.step)
  if int(meta.get("data", {}).get("step", start)) != start:
    raise ValueError(f"checkpoint step {start} has data-iterator state {meta['data']}.")
  if meta.get("method", method) != method:
    raise ValueError(f"{workdir} holds a checkpoint of method {meta.get('method')!r}, "
                     f"not {method!r}; use another --workdir.")
  changes = config_changes(meta["config"], config) if config and "config" in meta else []
  if changes and not allow_config_change:
    raise ValueError(
        f"{workdir} holds a checkpoint (step {start}) written with another config: "
        f"{'; '.join(changes)}. Resume with the saved values, use another --workdir, or pass "
        "--allow_config_change (train.py) / allow_config_change=True to resume anyway.")
  if changes:
    _log(f"[{method}] WARNING: resuming with a changed config: {'; '.join(changes)}")
  _log(f"[{method}] resumed from step {start} in {workdir}")
  return state, start


def train_one(config: ml_collections.ConfigDict, method: str, workdir: Optional[str], *,
              model: Any = None, max_steps: Optional[int] = None,
              on_step: Optional[Callable[[int], None]] = None,
              allow_config_change: bool = False) -> dict[str, Any]:
  """Trains one method; returns {'method', 'step', 'eval', 'eval_ema', 'preempted', 'state', ...}.

  `model`: a linen module (default: from `config.model` through the registry).
  `max_steps`: stop after this global step (the schedule still uses total_steps).
  `on_step`: called with the step number after each step is dispatched.
  `allow_config_change`: resume a checkpoint written with other config values.
  """
  mesh = from_config.mesh(config)
  check_batch_fits(config, mesh)
  ckpt = None
  writer = metrics_writer.MetricsWriter(workdir)
  if workdir:
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      keep=config.keep_checkpoints)
  num_classes = config.dataset.num_classes
  module = model if model is not None else from_config.model(config)
  objective = from_config.objective(config, method, mesh)
  erm = from_config.objective(config, "erm", mesh)
  apply_train = _f32_outputs(adapters.make_apply(module, train=True))
  apply_eval = _f32_outputs(adapters.make_apply(module, train=False))

  data = from_config.data(config, mesh, start_step=0)
  check_labels(config, data)
  steps, per_epoch = from_config.total_steps(config, data.train_examples)
  schedule = optim.make_schedule(config, steps, per_epoch)
  tx = optim.make_optimizer(config, schedule)

  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)
  state, state_sharding = create_train_state(config, module, objective, tx, mesh)
  start = 0
  if ckpt is not None:
    try:
      state, start = restore_checkpoint(ckpt, state, method, workdir, config,
                                        allow_config_change)
    except BaseException:
      data.train.close()
      ckpt.close()
      writer.close()
      raise
    if start:
      writer.truncate(start)
  if start and isinstance(data.train, input_pipeline.TrainIterator):
    data.train.step = start  # A pure function of the step: nothing else to restore.
  elif start:
    data.train.close()
    data = from_config.data(config, mesh, start_step=start)

  step_kwargs = dict(apply=apply_train, tx=tx, schedule=schedule, ema_decay=config.ema_decay,
                     accum_steps=config.optimizer.grad_accum_steps)
  jit_step = lambda obj: jax.jit(  # noqa: E731
      functools.partial(ts.train_step, objective=obj, **step_kwargs),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=0)
  p_step = jit_step(objective)
  p_erm_step = jit_step(erm) if config.mix.erm_warmup_steps and method != "erm" else p_step
  p_eval = jax.jit(functools.partial(
      ts.eval_step, apply=apply_eval, num_classes=num_classes,
      loss_fn=getattr(erm, "loss_fn"), to_logits=getattr(erm, "to_logits")),
      out_shardings=replicated)  # Inputs keep their shardings (state's, batch_sharding).

  def evaluate(variables) -> dict[str, float]:
    sums = None
    for batch in data.eval_batches():
      out = p_eval(variables, sharding.global_batch(batch, batch_sharding))
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / n, "top1": float(sums["top1"]) / n,
            "top5": float(sums["top5"]) / n}

  def run_eval(step: int) -> dict[str, Any]:
    out = {"eval": evaluate({"params": state.params, **state.model_state})}
    record = {k: v for k, v in out["eval"].items()}
    if config.ema_decay:
      out["eval_ema"] = evaluate({"params": state.ema_params, **state.ema_model_state})
      record.update({f"ema_{k}": v for k, v in out["eval_ema"].items()})
    writer.write(step, "eval", record)
    return out

  last = min(steps, max_steps) if max_steps else steps
  preempt = _Preemption()
  preempt.install()
  bar = metrics_writer.ProgressBar(last, start, desc=method, enabled=config.progress_bar)
  pending: list[tuple[int, dict]] = []
  result: dict[str, Any] = {"method": method, "preempted": False, "total_steps": steps}
  t_log, n_images = time.time(), 0
  skipped_steps: list[int] = []

  def flush() -> None:
    """Fetches pending metrics, stops on non-finite steps, writes the train record."""
    nonlocal t_log, n_images
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps_done = [s for s, _ in pending]
    pending.clear()
    for s, m in zip(steps_done, fetched):
      if not m["finite"]:
        if config.nan_policy == "stop":
          raise FloatingPointError(
              f"[{method}] non-finite loss or gradient at step {s} (loss={float(m['loss'])}); "
              "stopping without saving (the last checkpoint is intact). Set "
              "config.nan_policy='skip' to drop such steps instead.")
        skipped_steps.append(s)
        bar.write(f"[{method}] step {s}: non-finite loss/gradient, update skipped.")
    now = time.time()
    record = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in fetched[-1]}
    record["images_per_s"] = n_images / max(now - t_log, 1e-9)
    record["epoch"] = (steps_done[-1] + 1) / per_epoch
    t_log, n_images = now, 0
    writer.write(steps_done[-1] + 1, "train", record)
    bar.update(0, {"loss": record["loss"], "img/s": round(record["images_per_s"])})

  def save(step: int) -> None:
    if ckpt is not None:
      flush()
      ckpt.save(step, state, {"step": step, "method": method, "data": {"step": step},
                              "config": config.to_json()})

  device_batches = sharding.prefetch_to_device(data.train, batch_sharding)
  try:
    step = start
    while step < last:
      stop = (preempt.requested if jax.process_count() == 1
              else _any_process(preempt.requested, step, config))
      if stop:
        flush()
        save(step)
        result["preempted"] = True
        bar.write(f"[{method}] SIGTERM: saved step {step}, exiting.")
        break
      batch = next(device_batches)
      fn = p_erm_step if step < config.mix.erm_warmup_steps else p_step
      state, metrics = fn(state, batch)
      pending.append((step, metrics))
      n_images += config.batch_size
      step += 1
      bar.update(1)
      if on_step is not None:
        on_step(step)
      if step % config.log_every_steps == 0 or step == last:
        flush()
      if ckpt is not None and (step % config.checkpoint_every_steps == 0 or step == last):
        save(step)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step != last:
        run_eval(step)
    flush()
    if not result["preempted"]:
      result.update(run_eval(step))
    result["step"] = step
    result["skipped_steps"] = skipped_steps
    result["state"] = state
    result["train"] = next((r for r in reversed(writer.records) if r["kind"] == "train"), {})
  finally:
    preempt.uninstall()
    bar.close()
    data.train.close()
    if ckpt is not None:
      ckpt.close()
    writer.close()
  return result


def check_batch_fits(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh and processes."""
  for n, what in ((mesh.size, f"{mesh.size} devices of the mesh (jax.device_count()="
                   f"{jax.device_count()}, config.mesh_data x config.mesh_fsdp)"),
                  (jax.process_count(), f"{jax.process_count()} processes")):
    if config.batch_size % n:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {what}; "
                       f"use a multiple of {n}.")


def check_labels(config: ml_collections.ConfigDict, data: from_config.Data) -> None:
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


def _any_process(flag: bool, step: int, config) -> bool:
  """Multi-host: agree on preemption every log interval (all processes save together)."""
  if jax.process_count() == 1 or step % config.log_every_steps:
    return False
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Optional[str] = None, *,
                       model: Any = None, max_steps: Optional[int] = None,
                       on_step: Optional[Callable[[int], None]] = None,
                       allow_config_change: bool = False) -> list[dict[str, Any]]:
  """Validates `config` and trains each of its methods in turn; returns their results."""
  config_utils.validate(config)
  runs = config_utils.methods(config)
  if model is None:  # Build once up front: bad model kwargs fail before anything compiles.
    from_config.model(config)
  results = []
  for method in runs:
    sub = os.path.join(workdir, method) if workdir and len(runs) > 1 else workdir
    res = train_one(config, method, sub, model=model, max_steps=max_steps, on_step=on_step,
                    allow_config_change=allow_config_change)
    results.append(res)
    if res["preempted"]:
      break
    msg = f"[{method}] step {res['step']}: test accuracy {100 * res['eval']['top1']:.2f}%"
    if "eval_ema" in res:
      msg += f" (EMA {100 * res['eval_ema']['top1']:.2f}%)"
    _log(msg)
  if len(results) > 1 and jax.process_index() == 0:
    print("\nFinal test accuracy:")
    for r in results:
      print(f"  {r['method']:>20s}: {100 * r['eval']['top1']:.2f}%")
  return results


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """Parses the command line into a validated config and the other flags."""
  rest, overrides = config_utils.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="config file, optionally with ':arg' (default: configs/digits.py)")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints and logs; an existing checkpoint is resumed")
  parser.add_argument("--max_steps", type=int, default=None,
                      help="stop after this step (schedules still use config.total_steps)")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="resume a checkpoint written with other config values")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args(rest)
  config = config_utils.apply_overrides(config_utils.load_config(args.config), overrides)
  config_utils.validate(config)
  return config, args


def main(argv: Sequence[str]) -> int:
  try:
    config, args = parse_args(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.coordinator_address or os.environ.get("MIXJAX_DISTRIBUTED"):
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  try:
    train_and_evaluate(config, args.workdir, max_steps=args.max_steps,
                       allow_config_change=args.allow_config_change)
  except (ValueError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
