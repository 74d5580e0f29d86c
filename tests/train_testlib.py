"""Small models, configs and a subprocess entry point for the training-system tests.

Run as a script with the repository root on PYTHONPATH, it trains
`tiny_config()` with a local model in a workdir (used by the kill/resume and
multi-process tests):
    PYTHONPATH=. python tests/train_testlib.py WORKDIR STEPS [--sleep S] [--distributed ADDR N ID]
        [--model mlp] [--log_every N] [--sigterm_at STEP]
    PYTHONPATH=. python tests/train_testlib.py coefficients OUTDIR --distributed ADDR N ID
The second form draws the coefficients of every sharing scope on the global
mesh and writes what this process holds (`coefficients_main`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def whole_model_passes(apply):
  """`apply` as a plain ApplyFn (no `encodes_at`): every pass runs the whole model.

  The reference for the paths that start a pass at a hidden point (AMP's
  lambda passes, MixupE's concatenated pass over AMP).
  """
  return lambda v, x, *, key=None, mix=None: apply(v, x, key=key, mix=mix)


def assert_fast_path_equals_whole_model(obj, fast_apply, whole_apply, v, x, y):
  """`obj`'s loss, parameter gradient, new state and metrics on `fast_apply` (split at the
  point) equal those on `whole_apply` (whole-model passes), at under 0.95x its FLOPs.

  Returns (new state, metrics) of the fast path.
  """
  import chex
  import numpy as np

  def compiled(a):
    f = jax.value_and_grad(lambda p: obj(a, {**v, "params": p}, x, y, jax.random.key(3)),
                           has_aux=True)
    return jax.jit(f).lower(v["params"]).compile()

  fast, slow = compiled(fast_apply), compiled(whole_apply)
  (loss, (state, metrics)), grads = fast(v["params"])
  (loss_ref, (state_ref, metrics_ref)), grads_ref = slow(v["params"])
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  chex.assert_trees_all_close(state, state_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(metrics, metrics_ref, rtol=1e-5, atol=1e-6)
  assert fast.cost_analysis()["flops"] < 0.95 * slow.cost_analysis()["flops"]
  return state, metrics


def assert_concat_pass_starts_at_point(obj, apply, v, x, y, matmuls_above: int) -> None:
  """MixupE over AMP at a hidden point (`obj`, groups 1) on `apply`, split at the point.

  Equal to whole-model passes (`assert_fast_path_equals_whole_model`), and its
  concatenated pass runs only the `matmuls_above` dense layers and convolutions
  above the point on the [mixed; clean] rows (counted in the traced program),
  where whole-model passes run every one of them there.
  """
  assert_fast_path_equals_whole_model(obj, apply, whole_model_passes(apply), v, x, y)
  batch = x.shape[0]
  rows = batch + max(1, round(obj.rho * batch))
  count = lambda a: matmuls_on_rows(  # noqa: E731
      lambda vs: obj(a, vs, x, y, jax.random.key(3)), v, rows=rows)
  assert count(apply) == matmuls_above < count(whole_model_passes(apply)), (
      count(apply), matmuls_above, count(whole_model_passes(apply)))


def matmuls_on_rows(fn, *args, rows: int) -> int:
  """How many dot_general / conv_general_dilated ops of `fn(*args)`'s jaxpr output `rows` rows."""
  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if (eqn.primitive.name in ("dot_general", "conv_general_dilated")
          and eqn.outvars[0].aval.shape[:1] == (rows,)):
        n += 1
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          sub = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr's Jaxpr.
          if hasattr(sub, "eqns"):
            n += walk(sub)
    return n
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def assert_lambda_gradient(fast, whole, lam: jax.Array) -> None:
  """AMP's lambda passes `fast` (split at the point) against `whole` (whole-model passes).

  Both map lam f[B] (float64) -> per-example losses f[B]: equal values and
  `amp.lam_grad`s, and the gradient equal to central finite differences of the
  whole-model passes' summed loss (which must depend on lam).
  """
  import numpy as np

  from mixjax import amp
  grad, values = jax.jit(lambda l: amp.lam_grad(fast, l))(lam)
  grad_ref, values_ref = jax.jit(lambda l: amp.lam_grad(whole, l))(lam)
  np.testing.assert_allclose(values, values_ref, rtol=1e-10)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-9, atol=1e-12)
  total = jax.jit(lambda l: jnp.sum(whole(l)))
  h = 1e-6
  fd = np.array([(total(lam.at[i].add(h)) - total(lam.at[i].add(-h))) / (2 * h)
                 for i in range(lam.shape[0])])
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
  assert np.abs(fd).max() > 1e-2


class TinyResNet(nn.Module):
  """Conv + BN stem, one residual block with BN, global pool, dense head."""
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    y = norm()(nn.Conv(self.width, (3, 3), use_bias=False)(y))
    x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TinyCNN(nn.Module):
  """The digits stand-in: two convs, max-pool, two dense layers, dropout-free."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


class TinyMLP(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(self.num_classes)(x)


def tiny_config(steps: int = 12, method: str = "mixup"):
  """Synthetic 8x8x3 images, 10 classes, TinyResNet-sized, SGD, EMA, logs every step."""
  c = config_utils.base_config()
  c.method = method
  c.mix.alpha = 1.0
  c.dataset.name = "synthetic"
  c.dataset.input_shape = (8, 8, 3)
  c.dataset.num_classes = 10
  c.dataset.train_examples = 256
  c.dataset.eval_examples = 64
  c.dataset.augment = "cifar"
  c.dataset.prefetch = 2
  c.batch_size = 16
  c.eval_batch_size = 64
  c.total_steps = steps
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 2
  c.ema_decay = 0.9
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 3
  c.mesh_data = 1
  c.progress_bar = False
  return c


@contextlib.contextmanager
def compilation_cache(path: str) -> Iterator[str]:
  """JAX's persistent compilation cache in `path`, for this process and its subprocesses.

  Identical programs (the eval step or the init of several methods on one
  model, the same run in a subprocess) then compile once.
  """
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  try:
    yield path
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def train_losses(workdir: str) -> dict[int, float]:
  """{step: loss} of the train records in workdir/metrics.jsonl."""
  from mixjax import metrics_writer
  recs = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def free_port() -> int:
  """A free local TCP port (for a `jax.distributed` coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def spawn(args, env_devices: int = 8, **kw) -> subprocess.Popen:
  """This file run as a script with `args`, on `env_devices` CPU devices (stdout piped)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, os.path.abspath(__file__)] + [str(a) for a in args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kw)


def communicate(procs, timeout: float) -> list[str]:
  """The output of each process; all are killed if one overruns `timeout` seconds."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _distributed(spec) -> None:
  addr, n, pid = spec
  jax.distributed.initialize(coordinator_address=addr, num_processes=int(n),
                             process_id=int(pid), initialization_timeout=60)


def coefficients_main(argv) -> None:
  """Draws mixup coefficients per batch, host and device on the global (data,) mesh.

  The key is the train step's, `fold_in(key(seed), step)`, the same in every
  process. Writes OUTDIR/coefficients_<process>.json: the per-batch lam this
  process holds, the per-host and per-device lam of the rows it holds, and the
  number of collectives in each compiled draw.
  """
  import json
  import re

  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from mixjax import mixing, policies
  outdir, spec = argv[0], argv[argv.index("--distributed") + 1:][:3]
  _distributed(spec)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = 4 * len(jax.devices())
  labels = jax.make_array_from_callback((batch,), NamedSharding(mesh, P("data")),
                                        lambda idx: np.arange(batch, dtype=np.int32)[idx] % 3)
  key = jax.random.fold_in(jax.random.key(0), 7)
  out = {"collectives": {}}
  for name, per_example, scope in [("batch", False, "example"), ("host", True, "host"),
                                   ("device", True, "device")]:
    pol = policies.mixup(0.4, per_example=per_example)
    f = jax.jit(lambda k, l, pol=pol, scope=scope: mixing.draw(
        k, l, batch, policy=pol, num_classes=3, mesh=mesh, scope=scope).coeffs.lam_x)
    hlo = f.lower(key, labels).compile().as_text()
    out["collectives"][name] = len(re.findall(
        r"\b(all-gather|all-to-all|collective-permute|all-reduce)(-start)?\(", hlo))
    lam = f(key, labels)
    shards = sorted(lam.addressable_shards, key=lambda s: s.index[0].start or 0
                    if lam.ndim else 0)
    out[name] = [float(v) for s in shards for v in np.asarray(s.data).reshape(-1)]
    if name == "batch":
      out[name] = out[name][:1]
  with open(os.path.join(outdir, f"coefficients_{jax.process_index()}.json"), "w") as fh:
    json.dump(out, fh)


def main(argv):
  if argv and argv[0] == "coefficients":
    return coefficients_main(argv[1:])
  import argparse
  import time

  import numpy as np

  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("steps", type=int)
  p.add_argument("--sleep", type=float, default=0.0)
  p.add_argument("--distributed", nargs=3, default=None)
  p.add_argument("--mesh_data", type=int, default=1)
  p.add_argument("--ckpt_every", type=int, default=4)
  p.add_argument("--mesh_fsdp", type=int, default=1)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--model", choices=("resnet", "mlp"), default="resnet")
  p.add_argument("--log_every", type=int, default=1)
  p.add_argument("--sigterm_at", type=int, default=None, help="SIGTERM itself after this step")
  a = p.parse_args(argv)
  if a.distributed:
    _distributed(a.distributed)
  import train
  c = tiny_config(a.steps)
  c.mesh_data, c.mesh_fsdp = a.mesh_data, a.mesh_fsdp
  c.checkpoint_every_steps = a.ckpt_every
  c.log_every_steps = a.log_every

  def on_step(step):
    time.sleep(a.sleep)
    if step == a.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
  model = TinyResNet(width=a.width) if a.model == "resnet" else TinyMLP()
  res = train.train_one(c, c.method, a.workdir, model=model, on_step=on_step)
  if not res["preempted"]:
    from jax.experimental import multihost_utils
    # FSDP leaves are split across processes: every process joins the gather.
    leaves = multihost_utils.process_allgather(jax.tree_util.tree_leaves(res["state"].params),
                                               tiled=True)
    if jax.process_index() == 0:
      flat = np.concatenate([np.asarray(x).ravel() for x in leaves])
      np.save(os.path.join(a.workdir, "final_params.npy"), flat)
  big = max(jax.tree_util.tree_leaves(res["state"].params), key=lambda x: x.size)
  print("LARGEST", big.shape, big.sharding.spec, flush=True)
  print("DONE", res["step"], "preempted" if res["preempted"] else "", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
