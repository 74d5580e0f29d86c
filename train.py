r"""Trains a model with ERM or a mixup-family method: the one entry point.

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
`--help` lists the recipes, methods, datasets, models and every config key
(`--help --config configs/x.py`: that recipe's values). Compiled programs are
kept in ~/.cache/mixjax/jax ($MIXJAX_CACHE_DIR; off with
--no_compilation_cache), so a second run skips most compiling. A run whose
final step is checkpointed and evaluated says so and exits, writing nothing.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import signal
import sys
import textwrap
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
from mixjax import study
from mixjax import train_step as ts

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")
CACHE_ENV = "MIXJAX_CACHE_DIR"  # JAX's persistent compilation cache (see `use_compilation_cache`).
NO_CACHE_ENV = "MIXJAX_NO_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "mixjax", "jax")


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
  changes = config_utils.config_changes(meta["config"], config) if config and "config" in meta else []
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
  from_config.check_before_data(config, mesh)
  ckpt = None
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
  from_config.check_labels(config, data)
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
      raise
  last = min(steps, max_steps) if max_steps else steps
  final_eval = metrics_writer.final_eval(workdir, last) if start == last else None
  if final_eval is not None:  # Already done: report it, write nothing.
    data.train.close()
    ckpt.close()
    _log(f"[{method}] already finished: step {last} is checkpointed and evaluated in "
         f"{workdir}; nothing to do (use another --workdir to train again).")
    return {"method": method, "preempted": False, "total_steps": steps, "step": last,
            "already_finished": True, "skipped_steps": [], "state": state, **final_eval}
  writer = metrics_writer.MetricsWriter(workdir)
  if start:
    writer.truncate(start)
  if start and isinstance(data.train, input_pipeline.TrainIterator):
    data.train.step = start  # A pure function of the step: nothing else to restore.
  elif start:
    data.train.close()
    data = from_config.data(config, mesh, start_step=start)

  step_kwargs = dict(apply=apply_train, tx=tx, schedule=schedule, ema_decay=config.ema_decay,
                     accum_steps=config.optimizer.grad_accum_steps, preprocess=data.preprocess)
  jit_step = lambda obj: jax.jit(  # noqa: E731
      functools.partial(ts.train_step, objective=obj, **step_kwargs),
      in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=0)
  p_step = jit_step(objective)
  p_erm_step = jit_step(erm) if config.mix.erm_warmup_steps and method != "erm" else p_step
  p_eval = jax.jit(functools.partial(
      ts.eval_step, apply=apply_eval, num_classes=num_classes,
      loss_fn=getattr(erm, "loss_fn"), to_logits=getattr(erm, "to_logits"),
      preprocess=data.preprocess),
      out_shardings=replicated)  # Inputs keep their shardings (state's, batch_sharding).

  def evaluate(variables) -> dict[str, float]:
    sums = None
    for batch in data.eval_batches():
      out = p_eval(variables, sharding.global_batch(batch, batch_sharding))
      sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / n, "top1": float(sums["top1"]) / n,
            "top5": float(sums["top5"]) / n,
            "ece": ts.expected_calibration_error(sums["calibration"])}

  def run_eval(step: int, final: bool = False) -> dict[str, Any]:
    variables = {"params": state.params, **state.model_state}
    out = {"eval": evaluate(variables)}
    if final and config.study.fgsm_eps:
      logits = lambda x: erm.to_logits(apply_eval(variables, x)[0])  # noqa: E731
      normalised = ({**b, "inputs": data.preprocess(b["inputs"])} for b in data.eval_batches())
      out["eval"]["fgsm_top1"] = 1.0 - study.fgsm_error(logits, normalised, config.study.fgsm_eps)
    record = {k: v for k, v in out["eval"].items()}
    if config.ema_decay:
      out["eval_ema"] = evaluate({"params": state.ema_params, **state.ema_model_state})
      record.update({f"ema_{k}": v for k, v in out["eval_ema"].items()})
    writer.write(step, "eval", record)
    return out

  preempt = _Preemption()
  preempt.install()
  bar = metrics_writer.ProgressBar(last, start, desc=method, enabled=config.progress_bar)
  pending: list[tuple[int, dict]] = []
  result: dict[str, Any] = {"method": method, "preempted": False, "total_steps": steps}
  t_log, n_images = time.time(), 0
  t_excluded = 0.0  # Seconds since t_log spent compiling: not part of img/s.
  compiled: set[int] = set()  # id() of the step functions already compiled.
  skipped_steps: list[int] = []

  def flush() -> None:
    """Fetches pending metrics, stops on non-finite steps, writes the train record."""
    nonlocal t_log, n_images, t_excluded
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
    if n_images:  # None when the interval held only compiling steps.
      record["images_per_s"] = n_images / max(now - t_log - t_excluded, 1e-9)
    record["epoch"] = (steps_done[-1] + 1) / per_epoch
    t_log, n_images, t_excluded = now, 0, 0.0
    writer.write(steps_done[-1] + 1, "train", record)
    postfix = {"loss": record["loss"]}
    if "images_per_s" in record:
      postfix["img/s"] = round(record["images_per_s"])
    bar.update(0, postfix)

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
      compiling = id(fn) not in compiled
      if compiling:
        bar.write(f"[{method}] compiling the train step...")
        t_compile = time.time()
      state, metrics = fn(state, batch)
      if compiling:  # Its time (compile + one step) is kept out of img/s and the ETA.
        jax.block_until_ready(metrics)
        compiled.add(id(fn))
        seconds = time.time() - t_compile
        t_excluded += seconds
        result["compile_s"] = result.get("compile_s", 0.0) + seconds
        bar.write(f"[{method}] compiled the train step in {seconds:.1f} s")
      else:
        n_images += config.batch_size
      pending.append((step, metrics))
      step += 1
      bar.update(1)
      if compiling:
        bar.restart_clock()
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
      result.update(run_eval(step, final=True))
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
  methods = config_utils.methods(config)
  if model is None:  # Build once up front: bad model kwargs fail before anything compiles.
    from_config.model(config)
  is_study = study.is_study(config)
  runs = study.runs(config, methods)
  results = []
  for run in runs:
    sub = (os.path.join(workdir, run.subdir(is_study)) if workdir and len(runs) > 1
           else workdir)
    tag = run.method if not is_study else f"{run.method}, seed {run.seed}" + (
        f", {100 * run.corruption:g}% corrupted labels" if run.corruption else "")
    res = train_one(study.config_for(config, run), run.method, sub, model=model,
                    max_steps=max_steps, on_step=on_step,
                    allow_config_change=allow_config_change)
    results.append(res)
    if res["preempted"]:
      break
    msg = f"[{tag}] step {res['step']}: test accuracy {100 * res['eval']['top1']:.2f}%"
    if "eval_ema" in res:
      msg += f" (EMA {100 * res['eval_ema']['top1']:.2f}%)"
    _log(msg)
  done = [(run, res) for run, res in zip(runs, results) if not res["preempted"]]
  if is_study and len(done) == len(runs):
    table, data = study.summarize(config, done)
    if jax.process_index() == 0:
      print("\n" + table)
      study.write(workdir, table, data)
  elif len(results) > 1 and jax.process_index() == 0:
    print("\nFinal test accuracy:")
    for r in results:
      print(f"  {r['method']:>20s}: {100 * r['eval']['top1']:.2f}%")
  return results


def recipes(configs_dir: str = os.path.dirname(DEFAULT_CONFIG)) -> dict[str, str]:
  """{'configs/x.py': the first line of its docstring} for each recipe in `configs_dir`."""
  out = {}
  for name in sorted(os.listdir(configs_dir)):
    if name.endswith(".py") and not name.startswith("_"):
      with open(os.path.join(configs_dir, name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      out[f"configs/{name}"] = doc.strip().split("\n")[0]
  return out


def help_text(config: Optional[ml_collections.ConfigDict] = None,
              config_spec: Optional[str] = None) -> str:
  """The text after `--help`: recipes, methods, datasets, models, every config key.

  config: the values to list (a recipe after overrides); None lists the defaults.
  """
  from mixjax import methods
  from mixjax import models
  width = max(len(k) for k in recipes())
  recipe_lines = "\n".join(f"  {k:<{width}}  {v}" for k, v in recipes().items())
  values = (f"config keys, with the values of {config_spec}" if config_spec
            else "config keys and defaults (--help --config configs/x.py: that recipe's values)")
  return f"""
{__doc__.split(chr(10) * 2, 1)[1].rstrip()}

recipes (--config configs/x.py[:arg]):
{recipe_lines}

methods (--config.method):
{textwrap.indent(methods.__doc__.split(chr(10) * 2, 1)[1].strip(), "  ")}
  bases: {", ".join(methods.BASES)}; wrappers: {", ".join(methods.WRAPPERS)}
  examples: mixup, erm, untied+amp, dat, mixup+amp+mixupe, erm+mixupe, 'mixup,erm' (each in turn)

datasets (--config.dataset.name): {", ".join(config_utils.DATASETS)}
models (--config.model.name): {", ".join(models.list_models())}

{values} (--config.key=value):
{config_utils.describe(config)}

compilation cache: compiled programs are kept in ${CACHE_ENV} (default
{DEFAULT_CACHE_DIR}); --no_compilation_cache or {NO_CACHE_ENV}=1 turns it off.
"""


def _print_help(argv: Sequence[str], parser: argparse.ArgumentParser) -> None:
  """`--help`/`-h`/`--config.help`: prints the help (with --config: that recipe's values)."""
  argv = [a for a in argv if a != "--config.help"]
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config", default=None)
  known, _ = pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])
  rest, overrides = config_utils.split_argv(argv)
  config = None
  if known.config or overrides:
    config = config_utils.apply_overrides(
        config_utils.load_config(known.config or DEFAULT_CONFIG), overrides)
  parser.epilog = help_text(config, known.config)
  parser.print_help()


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """Parses the command line into a validated config and the other flags.

  `--help` (or `--config.help`) prints `help_text` and raises SystemExit(0).
  """
  rest, overrides = config_utils.split_argv([a for a in argv if a != "--config.help"])
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
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help=f"do not keep compiled programs in ${CACHE_ENV} "
                           f"(default {DEFAULT_CACHE_DIR}); or set {NO_CACHE_ENV}=1")
  if {"-h", "--help", "--config.help"} & set(argv):
    _print_help(argv, parser)
    raise SystemExit(0)
  args = parser.parse_args(rest)
  config = config_utils.apply_overrides(config_utils.load_config(args.config), overrides)
  config_utils.validate(config)
  return config, args


def use_compilation_cache(disable: bool = False) -> Optional[str]:
  """Turns on JAX's persistent compilation cache; returns its folder (None when off).

  The folder is $MIXJAX_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else
  ~/.cache/mixjax/jax. Programs that took over 0.1 s to compile are kept, so a
  second run of the same config (CPU ones included) loads its train step from
  disk. Off with `disable` (--no_compilation_cache) or
  MIXJAX_NO_COMPILATION_CACHE=1.
  """
  if disable or os.environ.get(NO_CACHE_ENV, "0") not in ("", "0"):
    return None
  path = os.path.expanduser(os.environ.get(CACHE_ENV) or
                            os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  return path


def main(argv: Sequence[str]) -> int:
  try:
    config, args = parse_args(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  use_compilation_cache(disable=args.no_compilation_cache)
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
