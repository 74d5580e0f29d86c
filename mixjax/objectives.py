"""Training objectives: a model's apply function and a method -> a scalar loss.

An objective is called as `objective(apply, variables, inputs, labels, key)`
and returns `(loss f32[], (new_model_state, metrics))`, so a train step is
generic over methods. `apply(variables, inputs, *, key, mix)` runs the model
(`make_apply` builds one from a linen module, `make_apply_fn` from a plain
function) and returns `(outputs, new_model_state)`; `mix` is a `MixSpec` or
None. AMP (`mixjax.amp`) and MixupE (`mixjax.mixupe`) wrap `Mixup` objectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixjax import checks
from mixjax import hidden
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import pairing as pairing_lib
from mixjax import policies

PyTree = Any
Metrics = dict[str, jax.Array]


class MixSpec(NamedTuple):
  """Where and how to mix inside a forward pass.

  point: None for the input, else a submodule path (e.g. 'stage2').
  lam: f32[] or f32[B] input coefficient; perm: int32[B] partner indices.
  mesh/axis_name: shard-local mixing over a sharded batch (see `mixing`).
  """
  point: Optional[str]
  lam: jax.Array
  perm: jax.Array
  mesh: Optional[Mesh] = None
  axis_name: mixing.AxisName = "data"


ApplyFn = Callable[..., tuple[Any, PyTree]]
Objective = Callable[[ApplyFn, PyTree, PyTree, jax.Array, jax.Array], tuple[jax.Array, tuple[PyTree, Metrics]]]


def make_apply(module: nn.Module, train: bool = True, mutable: tuple[str, ...] = ("batch_stats",),
               train_arg: Optional[str] = "train") -> ApplyFn:
  """An `ApplyFn` for a linen module called as `module(x, train=train)`.

  Collections in `mutable` that are present in `variables` are updated when
  `train` and returned as the new model state ({} otherwise). `key` seeds the
  'dropout' stream. `train_arg=None` for modules without a train flag.
  """
  def apply(variables, inputs, *, key=None, mix: Optional[MixSpec] = None):
    rngs = {"dropout": key} if key is not None else {}
    kwargs = {train_arg: train} if train_arg else {}
    cols = [c for c in mutable if c in variables] if train else []
    if mix is not None and mix.point is None:
      inputs = mixing.mix_with_partner(inputs, mix.perm, mix.lam, mesh=mix.mesh,
                                       axis_name=mix.axis_name)
    ctx = (hidden.mix_at(mix.point, mix.lam, mix.perm, mesh=mix.mesh, axis_name=mix.axis_name)
           if mix is not None and mix.point is not None else contextlib.nullcontext())
    with ctx:
      if cols:
        out, state = module.apply(variables, inputs, rngs=rngs, mutable=cols, **kwargs)
        return out, dict(state)
      return module.apply(variables, inputs, rngs=rngs, **kwargs), {}
  return apply


def make_apply_fn(fn: Callable[[PyTree, PyTree], jax.Array]) -> ApplyFn:
  """An `ApplyFn` for a plain `fn(params, x) -> outputs` (variables = {'params': params})."""
  def apply(variables, inputs, *, key=None, mix: Optional[MixSpec] = None):
    del key
    if mix is not None:
      if mix.point is not None:
        raise ValueError("a plain apply function has no submodules: use point=None (input mixing).")
      inputs = mixing.mix_with_partner(inputs, mix.perm, mix.lam, mesh=mix.mesh,
                                       axis_name=mix.axis_name)
    return fn(variables["params"], inputs), {}
  return apply


_NNX_HOOKS: list[Callable[[Any], Any]] = []


@contextlib.contextmanager
def nnx_call_hook(hook: Callable[[Any], Any]):
  """While active, `make_nnx_apply`'s apply runs the model inside `hook(model)`.

  `hook` takes the merged `nnx.Module` and returns a context manager; it is the
  NNX counterpart of `flax.linen.intercept_methods` (MixupE uses it to route
  the batch-norm and dropout layers of its concatenated pass). Like linen's
  interceptors it acts while the apply function is traced.
  """
  _NNX_HOOKS.append(hook)
  try:
    yield
  finally:
    _NNX_HOOKS.remove(hook)


def make_nnx_apply(model: Any, train: bool = True) -> tuple[ApplyFn, PyTree]:
  """An `ApplyFn` and its initial variables for a `flax.nnx` model.

  Returns `(apply, variables)` with `variables = {'params': nnx.State of
  nnx.Param, 'nnx_state': the rest (batch statistics, RNG counters)}`; the new
  model state returned by `apply` is `{'nnx_state': ...}`. The model's RNG keys
  are replaced by keys folded from `key` (so dropout is a pure function of
  it); `train` selects `model.train()` or `model.eval()` behaviour.
  """
  from flax import nnx

  graphdef, params, rng_keys, rest = nnx.split(model, nnx.Param, nnx.RngKey, ...)
  copy = lambda tree: jax.tree_util.tree_map(lambda a: a, tree)  # noqa: E731  (fresh Variables)

  def apply(variables, inputs, *, key=None, mix: Optional[MixSpec] = None):
    keys = copy(rng_keys)
    if key is not None:
      leaves, treedef = jax.tree_util.tree_flatten(keys)
      keys = jax.tree_util.tree_unflatten(
          treedef, [jax.random.fold_in(key, i) for i in range(len(leaves))])
    m = nnx.merge(graphdef, copy(variables["params"]), keys, copy(variables["nnx_state"]))
    m.train() if train else m.eval()
    if mix is not None and mix.point is None:
      inputs = mixing.mix_with_partner(inputs, mix.perm, mix.lam, mesh=mix.mesh,
                                       axis_name=mix.axis_name)
    ctx = (hidden.nnx_mix_at(m, mix.point, mix.lam, mix.perm, mesh=mix.mesh,
                             axis_name=mix.axis_name)
           if mix is not None and mix.point is not None else contextlib.nullcontext())
    with ctx, contextlib.ExitStack() as hooks:
      for hook in list(_NNX_HOOKS):
        hooks.enter_context(hook(m))
      out = m(inputs)
    _, _, _, new_rest = nnx.split(m, nnx.Param, nnx.RngKey, ...)
    return out, {"nnx_state": new_rest}

  return apply, {"params": params, "nnx_state": rest}


def identity(x):
  """The default `to_logits`: outputs are the class scores."""
  return x


@dataclasses.dataclass(frozen=True)
class Erm:
  """Empirical risk minimisation: mean of `loss_fn(outputs, targets)`."""
  loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy
  num_classes: Optional[int] = None
  label_smoothing: float = 0.0
  to_logits: Callable[[jax.Array], jax.Array] = identity

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """Extra model-state collections this objective keeps ({}: none)."""
    del sample_inputs
    return {}

  def __call__(self, apply, variables, inputs, labels, key):
    targets = mixing.to_targets(labels, self.num_classes, self.label_smoothing)
    outputs, state = apply(variables, inputs, key=key)
    loss = jnp.mean(self.loss_fn(outputs, targets))
    return loss, (state, {"loss": loss})


class Draw(NamedTuple):
  """The random part of a mixup step: spec (MixSpec), coeffs, targets of i and of perm[i]."""
  spec: MixSpec
  coeffs: policies.Coefficients
  targets_a: jax.Array
  targets_b: jax.Array


@dataclasses.dataclass(frozen=True)
class Mixup:
  """The mixup family as an objective: the policy picks mixup, Untied MixUp or DAT.

  point: None mixes inputs, a submodule path mixes that hidden output.
  interpolate: interpolate losses (True) or use mixed targets (False).
  mesh/axis_name: shard-local pairing and mixing over a batch-sharded mesh.
  """
  policy: policies.Policy
  pairing: pairing_lib.Pairing = pairing_lib.random_permutation
  loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy
  num_classes: Optional[int] = None
  point: Optional[str] = None
  interpolate: bool = True
  label_smoothing: float = 0.0
  mesh: Optional[Mesh] = None
  axis_name: mixing.AxisName = "data"
  to_logits: Callable[[jax.Array], jax.Array] = identity

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """Extra model-state collections this objective keeps ({}: none)."""
    del sample_inputs
    return {}

  def draw(self, key: jax.Array, inputs: PyTree, labels: jax.Array) -> Draw:
    """Samples coefficients and partners for a batch."""
    if self.point is None:  # Hidden-layer mixing may take token ids as inputs.
      checks.float_leaves("inputs", inputs)
    batch = checks.batch_size("inputs", inputs)
    if checks.batch_size("labels", labels) != batch:
      raise ValueError(f"labels have batch size {checks.batch_size('labels', labels)} but "
                       f"inputs have {batch}; they must match.")
    targets = mixing.to_targets(labels, self.num_classes, self.label_smoothing)
    k_lam, k_pair = jax.random.split(key)
    coeffs = self.policy(k_lam, batch)
    perm = mixing.pair(k_pair, mixing.class_ids(labels), self.pairing, mesh=self.mesh,
                       axis_name=self.axis_name)
    spec = MixSpec(self.point, coeffs.lam_x, perm, self.mesh, self.axis_name)
    targets_b = mixing.take(targets, perm, mesh=self.mesh, axis_name=self.axis_name)
    return Draw(spec, coeffs, targets, targets_b)

  def losses(self, apply: ApplyFn, variables: PyTree, inputs: PyTree, draw: Draw,
             key: Optional[jax.Array], lam_x: Optional[jax.Array] = None):
    """Per-example losses f32[B] (and outputs, new model state) for a draw.

    `lam_x` overrides the input coefficient (the label one stays `draw.coeffs.lam_y`).
    """
    spec = draw.spec if lam_x is None else draw.spec._replace(lam=lam_x)
    outputs, state = apply(variables, inputs, key=key, mix=spec)
    per_example = losses_lib.mixup_loss(self.loss_fn, outputs, draw.targets_a, draw.targets_b,
                                        draw.coeffs.lam_y, self.interpolate)
    return per_example, outputs, state

  def __call__(self, apply, variables, inputs, labels, key):
    k_mix, k_drop = jax.random.split(key)
    draw = self.draw(k_mix, inputs, labels)
    per_example, _, state = self.losses(apply, variables, inputs, draw, k_drop)
    loss = jnp.mean(per_example)
    return loss, (state, {"loss": loss, "lam_mean": jnp.mean(draw.coeffs.lam_x)})


def erm(loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
        num_classes: Optional[int] = None, label_smoothing: float = 0.0) -> Erm:
  """ERM objective (see `Erm`)."""
  return Erm(loss_fn, num_classes, label_smoothing)


def mixup(policy: policies.Policy, pairing: pairing_lib.Pairing = pairing_lib.random_permutation,
          loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
          num_classes: Optional[int] = None, point: Optional[str] = None,
          interpolate: bool = True, label_smoothing: float = 0.0,
          mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data") -> Mixup:
  """A mixup-family objective (see `Mixup`)."""
  return Mixup(policy, pairing, loss_fn, num_classes, point, interpolate, label_smoothing,
               mesh, axis_name)
