"""Small models, configs and a subprocess entry point for the training-system tests.

Run as a script with the repository root on PYTHONPATH, it trains
`tiny_config()` with a local model in a workdir (used by the kill/resume and
multi-process tests):
    PYTHONPATH=. python tests/train_testlib.py WORKDIR STEPS [--sleep S] [--distributed ADDR N ID]
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixjax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def main(argv):
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
  a = p.parse_args(argv)
  if a.distributed:
    addr, n, pid = a.distributed
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(n),
                               process_id=int(pid), initialization_timeout=60)
  import train
  c = tiny_config(a.steps)
  c.mesh_data, c.mesh_fsdp = a.mesh_data, a.mesh_fsdp
  c.checkpoint_every_steps = a.ckpt_every
  on_step = (lambda s: time.sleep(a.sleep)) if a.sleep else None
  res = train.train_one(c, c.method, a.workdir, model=TinyResNet(width=a.width), on_step=on_step)
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
