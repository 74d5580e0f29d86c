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

import contextlib
import functools
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import adapters
from mixjax import checkpointing
from mixjax import cli
from mixjax import compilation_cache
from mixjax import config_utils
from mixjax import evaluation
from mixjax import from_config
from mixjax import input_pipeline
from mixjax import metrics_writer
from mixjax import objectives as objectives_lib
from mixjax import optim
from mixjax import preemption
from mixjax import sharding
from mixjax import study
from mixjax import train_step as ts

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")


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
              allow_config_change: bool = False,
              preempt: Optional[preemption.Preemption] = None) -> dict[str, Any]:
  """Trains one method; returns {'method', 'step', 'eval', 'eval_ema', 'preempted', 'state', ...}.

  `model`: a linen module (default: from `config.model` through the registry).
  `max_steps`: stop after this global step (the schedule still uses total_steps).
  `on_step`: called with the step number after each step is dispatched.
  `allow_config_change`: resume a checkpoint written with other config values.
  `preempt`: the SIGTERM handler to obey (default: one installed first thing).
  """
  with contextlib.ExitStack() as stack:
    if preempt is None:
      preempt = stack.enter_context(preemption.Preemption())
    mesh = from_config.mesh(config)
    from_config.check_before_data(config, mesh)
    ckpt = None
    if workdir:
      ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints)
      stack.callback(ckpt.close)
    module = model if model is not None else from_config.model(config)
    objective = from_config.objective(config, method, mesh)
    erm = from_config.objective(config, "erm", mesh)
    # bf16 compute, losses and metrics in f32; AMP at a hidden point keeps its split path.
    apply_train = adapters.make_apply(module, train=True, output_dtype=jnp.float32)
    apply_eval = adapters.make_apply(module, train=False, output_dtype=jnp.float32)

    data = from_config.data(config, mesh, start_step=0)
    stack.callback(lambda: data.train.close())  # The latest `data`.
    from_config.check_labels(config, data)
    steps, per_epoch = from_config.total_steps(config, data.train_examples)
    schedule = optim.make_schedule(config, steps, per_epoch)
    tx = optim.make_optimizer(config, schedule)

    batch_sharding = sharding.batch_sharding(mesh)
    state, state_sharding = create_train_state(config, module, objective, tx, mesh)
    start = 0
    if ckpt is not None:
      state, start = restore_checkpoint(ckpt, state, method, workdir, config,
                                        allow_config_change)
    last = min(steps, max_steps) if max_steps else steps
    final_eval = metrics_writer.final_eval(workdir, last) if start == last else None
    if final_eval is not None:  # Already done: report it, write nothing.
      _log(f"[{method}] already finished: step {last} is checkpointed and evaluated in "
           f"{workdir}; nothing to do (use another --workdir to train again).")
      return {"method": method, "preempted": False, "total_steps": steps, "step": last,
              "already_finished": True, "skipped_steps": [], "state": state, **final_eval}
    writer = stack.enter_context(contextlib.closing(metrics_writer.MetricsWriter(workdir)))
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
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
    p_step = jit_step(objective)
    p_erm_step = jit_step(erm) if config.mix.erm_warmup_steps and method != "erm" else p_step
    evaluator = evaluation.Evaluator(apply_eval, erm, data.eval_batches, batch_sharding,
                                     config.dataset.num_classes, ema=bool(config.ema_decay),
                                     fgsm_eps=config.study.fgsm_eps,
                                     preprocess=data.preprocess)

    def run_eval(step: int, final: bool = False) -> dict[str, Any]:
      out = evaluator(state, final=final)
      writer.write(step, "eval", evaluation.record(out))
      return out

    bar = stack.enter_context(contextlib.closing(
        metrics_writer.ProgressBar(last, start, desc=method, enabled=config.progress_bar)))
    log = metrics_writer.TrainMetrics(writer, bar, method, config.nan_policy, per_epoch)
    result: dict[str, Any] = {"method": method, "preempted": False, "total_steps": steps}
    compiled: set[int] = set()  # id() of the step functions already compiled.

    def save(step: int) -> None:
      if ckpt is not None:
        log.flush()
        info = ckpt.save(step, state, {"step": step, "method": method, "data": {"step": step},
                                       "config": config.to_json()})
        if info is not None:
          bar.write(f"[{method}] {checkpointing.describe(info)}")

    device_batches = sharding.prefetch_to_device(data.train, batch_sharding)
    step = start
    while step < last:
      if preempt.should_stop(step, config.log_every_steps):
        log.flush()
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
      seconds = 0.0
      if compiling:  # Its time (compile + one step) is kept out of img/s and the ETA.
        jax.block_until_ready(metrics)
        compiled.add(id(fn))
        seconds = time.time() - t_compile
        result["compile_s"] = result.get("compile_s", 0.0) + seconds
        bar.write(f"[{method}] compiled the train step in {seconds:.1f} s")
      log.add(step, metrics, images=0 if compiling else config.batch_size, excluded_s=seconds)
      step += 1
      bar.update(1)
      if compiling:
        bar.restart_clock()
      if on_step is not None:
        on_step(step)
      if step % config.log_every_steps == 0 or step == last:
        log.flush()
      if ckpt is not None and (step % config.checkpoint_every_steps == 0 or step == last):
        save(step)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step != last:
        run_eval(step)
    log.flush()
    if not result["preempted"]:
      result.update(run_eval(step, final=True))
    result.update(step=step, skipped_steps=log.skipped_steps, state=state,
                  train=next((r for r in reversed(writer.records) if r["kind"] == "train"), {}))
  return result


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Optional[str] = None, *,
                       model: Any = None, max_steps: Optional[int] = None,
                       on_step: Optional[Callable[[int], None]] = None,
                       allow_config_change: bool = False,
                       preempt: Optional[preemption.Preemption] = None) -> list[dict[str, Any]]:
  """Validates `config` and trains each of its methods in turn; returns their results.

  A SIGTERM (caught from the start, `preempt` or one installed now) saves the
  current run at its next step and stops the rest.
  """
  with contextlib.ExitStack() as stack:
    if preempt is None:
      preempt = stack.enter_context(preemption.Preemption())
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
                      allow_config_change=allow_config_change, preempt=preempt)
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


def main(argv: Sequence[str]) -> int:
  with preemption.Preemption() as preempt:  # First thing: a SIGTERM from now on is kept.
    try:
      config, args = cli.parse_args(argv, __doc__, DEFAULT_CONFIG)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    compilation_cache.use(disable=args.no_compilation_cache)
    if args.coordinator_address or os.environ.get("MIXJAX_DISTRIBUTED"):
      jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes, process_id=args.process_id)
    try:
      train_and_evaluate(config, args.workdir, max_steps=args.max_steps,
                         allow_config_change=args.allow_config_change, preempt=preempt)
    except (ValueError, FloatingPointError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
