"""The sharded train step of every method moves no example data between devices.

Compiled over 8 CPU devices with the batch split along 'data' and shard-local
mixing, the optimized HLO of every method and combination, mixing at the input
and at a hidden layer, with the coefficient shared per example, pair, device,
host or batch, holds only all-reduces (gradients and global batch-norm
statistics): no all-gather, all-to-all or collective-permute of coefficients,
masks, lambda-gradients or examples.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import adapters, methods
from mixjax import train_step as ts

COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(")


class Net(nn.Module):
  """Dense, global batch norm, dense, head: 'fc2' is the hidden mixing point."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, name="fc1")(x.reshape(x.shape[0], -1))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = nn.relu(nn.Dense(16, name="fc2")(x))
    return nn.Dense(3, name="head")(x)


@functools.lru_cache(maxsize=None)  # The per-example counts are reused by the scope cases.
def _collectives(method: str, point, lam_scope: str = "example") -> dict[str, int]:
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  x, y = jnp.zeros((16, 4, 4, 1)), jnp.zeros((16,), jnp.int32)
  obj = methods.get_objective(method, num_classes=3, alpha=0.4, point=point, mesh=mesh,
                              axis_name="data", lam_scope=lam_scope,
                              pairing="reverse" if lam_scope == "pair" else "random")
  tx = optax.sgd(0.1, 0.9)

  def init():
    v = ts.init_variables(Net(), jax.random.key(0), x[:1])
    return ts.create_train_state({**v, **obj.init(x[:1])}, tx, jax.random.key(1), ema=False)

  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.eval_shape(init)
  step = jax.jit(functools.partial(ts.train_step, objective=obj,
                                   apply=adapters.make_apply(Net(), train=True), tx=tx),
                 in_shardings=(rep, shard), out_shardings=(rep, rep))
  text = step.lower(state, {"inputs": x, "labels": y}).compile().as_text()
  found: dict[str, int] = {}
  for m in COLLECTIVE.finditer(text):
    found[m.group(1)] = found.get(m.group(1), 0) + 1
  return found


MIXING = ["mixup", "untied", "dat", "mixup+amp", "mixup+mixupe", "untied+amp+mixupe"]
CASES = ([(m, None) for m in ["erm", "erm+mixupe"] + MIXING]  # ERM has no hidden mixing point.
         + [(m, "fc2") for m in MIXING])


@pytest.mark.parametrize("method,point", CASES)
def test_sharded_step_has_only_all_reduces(method, point):
  found = _collectives(method, point)
  assert found.get("all-reduce", 0) >= 1, found  # The gradient's.
  assert set(found) == {"all-reduce"}, found


# Every coefficient-sharing scope: the per-device (and per-host, per-pair) coefficients
# are sliced from a replicated draw, so the step gains no collective.
SCOPE_CASES = ([("mixup", None, s) for s in ("batch", "host", "device", "pair")]
               + [("untied+amp+mixupe", None, "device"), ("mixup+amp", "fc2", "device"),
                  ("mixup+mixupe", "fc2", "host")])


@pytest.mark.parametrize("method,point,lam_scope", SCOPE_CASES)
def test_sharing_scopes_add_no_collective(method, point, lam_scope):
  found = _collectives(method, point, lam_scope)
  assert found.get("all-reduce", 0) >= 1, found
  assert set(found) == {"all-reduce"}, found
  per_example = _collectives(method, point)
  assert found["all-reduce"] <= per_example["all-reduce"], (found, per_example)
