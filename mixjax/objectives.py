"""Training objectives: one protocol; `Erm`, `Mixup`, `Dirichlet` (k-way); `Wrapper` for methods.

An objective turns a model's `ApplyFn` (`mixjax.adapters`) and a batch into a
scalar loss. Every objective implements the same protocol (like optax's
`GradientTransformation`), so wrappers such as `amp.amp(obj)` and
`mixupe.mixupe(obj)` take any objective that implements it:

  init(sample_inputs) -> dict
      Extra model-state collections the objective keeps between steps
      (MixupE's running mean); merged into the variables, returned updated in
      the new model state. {} for most objectives.
  prepare(apply, variables, inputs, labels, key) -> Prepared
      Everything before the final pass: the `mixing.Draw` (coefficients,
      partners, targets), the final pass's dropout key, optional encoder
      output, metrics.
  forward(apply, variables, inputs, prepared) -> (outputs, new_model_state)
      The final pass.
  per_example(outputs, draw) -> f32[B]
      Per-example losses from the outputs.
  losses(apply, variables, inputs, prepared) -> (f32[B], outputs, new_model_state)
      `forward` then `per_example`.
  __call__(apply, variables, inputs, labels, key) -> (loss f32[], (new_model_state, metrics))
      What a train step differentiates.

and carries the attributes `loss_fn`, `to_logits` (outputs -> class scores),
`policy` (the mixing policy, None for ERM), `point` (None: input mixing),
`mesh`, `axis_name`, `decomposes` (the loss is the mean of `losses`, so a
wrapper may re-weigh or perturb it per example) and `mixes` (the draw has
mixing coefficients and partners).

`Wrapper` is the base for objectives built on another: it forwards every
method and attribute to `base`, so a wrapper overrides only what it changes.
A confidence penalty, for example, is a `Wrapper` whose `per_example` adds
`-beta * entropy(softmax(outputs))` to `self.base.per_example(outputs, draw)`;
it composes with `amp` and `mixupe` in any meaningful order (see
docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixjax import adapters
from mixjax import checks
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import pairing as pairing_lib
from mixjax import policies
from mixjax import sampling

PyTree = Any
Metrics = dict[str, jax.Array]
ApplyFn = adapters.ApplyFn


class Prepared(NamedTuple):
  """Everything before the final pass of a step.

  draw: the `mixing.Draw`; its `coeffs.lam_x` is the input coefficient of the
    final pass (AMP: `lam_final`, f32[B]).
  key: dropout key of the final pass.
  encoded: `adapters.Encoded` when the encoder of a `SplitApply` already ran
    (the final pass runs the head only), else None.
  metrics: f32[] scalars.
  """
  draw: mixing.Draw
  key: Optional[jax.Array]
  encoded: Optional[adapters.Encoded]
  metrics: Metrics


@runtime_checkable
class Objective(Protocol):
  """The objective protocol (see the module docstring)."""
  loss_fn: losses_lib.LossFn
  decomposes: bool
  mixes: bool

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]: ...

  def prepare(self, apply: ApplyFn, variables: PyTree, inputs: PyTree, labels: jax.Array,
              key: jax.Array) -> Prepared: ...

  def forward(self, apply: ApplyFn, variables: PyTree, inputs: PyTree,
              prepared: Prepared) -> tuple[Any, PyTree]: ...

  def per_example(self, outputs: Any, draw: mixing.Draw) -> jax.Array: ...

  def losses(self, apply: ApplyFn, variables: PyTree, inputs: PyTree,
             prepared: Prepared) -> tuple[jax.Array, Any, PyTree]: ...

  def __call__(self, apply: ApplyFn, variables: PyTree, inputs: PyTree, labels: jax.Array,
               key: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]: ...


def identity(x):
  """The default `to_logits`: outputs are the class scores."""
  return x


class _Steps:
  """The protocol's derived methods, in terms of `prepare`, `forward` and `per_example`."""

  def losses(self, apply: ApplyFn, variables: PyTree, inputs: PyTree,
             prepared: Prepared) -> tuple[jax.Array, Any, PyTree]:
    """(per-example losses f32[B], outputs, new model state) of the final pass."""
    outputs, state = self.forward(apply, variables, inputs, prepared)
    return self.per_example(outputs, prepared.draw), outputs, state

  def __call__(self, apply, variables, inputs, labels, key):
    checks.prng_key("key (the objective's last argument)", key)
    prepared = self.prepare(apply, variables, inputs, labels, key)
    per_example, _, state = self.losses(apply, variables, inputs, prepared)
    loss = jnp.mean(per_example)
    return loss, (state, {**prepared.metrics, "loss": loss})


@dataclasses.dataclass(frozen=True)
class _Unpaired(_Steps):
  """The fields and loss of the objectives whose draw has no single partner (`Erm`, `Dirichlet`).

  The loss is `loss_fn(outputs, draw.targets_a)` per example.
  """
  loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy
  num_classes: Optional[int] = None
  label_smoothing: float = 0.0
  to_logits: Callable[[jax.Array], jax.Array] = identity
  mesh: Optional[Mesh] = None
  axis_name: mixing.AxisName = "data"

  decomposes = True
  mixes = False
  policy = None
  point = None

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """Extra model-state collections this objective keeps ({}: none)."""
    del sample_inputs
    return {}

  def per_example(self, outputs, draw):
    return self.loss_fn(outputs, draw.targets_a)


@dataclasses.dataclass(frozen=True)
class Erm(_Unpaired):
  """Empirical risk minimisation: mean of `loss_fn(outputs, targets)`.

  mesh/axis_name: the mesh the batch is sharded over, for wrappers that lay
  out rows per shard (MixupE's clean pass); ERM itself does not use it.
  """

  def prepare(self, apply, variables, inputs, labels, key) -> Prepared:
    """The targets (no mixing); the whole key is the final pass's dropout key."""
    del apply, variables
    mixing.check_batch(inputs, labels, float_inputs=False)
    targets = mixing.to_targets(labels, self.num_classes, self.label_smoothing)
    return Prepared(mixing.Draw(None, None, targets, None), key, None, {})

  def forward(self, apply, variables, inputs, prepared):
    return apply(variables, inputs, key=prepared.key)


@dataclasses.dataclass(frozen=True)
class Mixup(_Steps):
  """The mixup family as an objective: the policy picks mixup, Untied MixUp or DAT.

  point: None mixes inputs, a submodule path mixes that hidden output.
  interpolate: interpolate losses (True) or use mixed targets (False).
  mesh/axis_name: shard-local pairing and mixing over a batch-sharded mesh.
  scope: where one coefficient is shared: 'example' (the policy's draw as it
    is), 'pair' (examples i and B-1-i, reverse pairing), 'device' or 'host'
    (one per device shard or process of the batch; `mixing.share`). One per
    batch is the policy's `per_example=False`.
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
  scope: str = "example"

  decomposes = True
  mixes = True

  def __post_init__(self):
    policies.check_policy("policy", self.policy)
    mixing.check_scope(self.scope, self.policy, self.pairing)

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """Extra model-state collections this objective keeps ({}: none)."""
    del sample_inputs
    return {}

  def draw(self, key: jax.Array, inputs: PyTree, labels: jax.Array) -> mixing.Draw:
    """Samples coefficients and partners for a batch (`mixing.draw`, as `mix_batch` does)."""
    # Hidden-layer mixing may take token ids as inputs.
    batch = mixing.check_batch(inputs, labels, float_inputs=self.point is None)
    return mixing.draw(key, labels, batch, policy=self.policy, pairing=self.pairing,
                       num_classes=self.num_classes, label_smoothing=self.label_smoothing,
                       mesh=self.mesh, axis_name=self.axis_name, scope=self.scope)

  def mix_spec(self, draw: mixing.Draw) -> adapters.MixSpec:
    """Where and how the final pass mixes, at the draw's input coefficient."""
    return adapters.MixSpec(self.point, draw.coeffs.lam_x, draw.perm, self.mesh, self.axis_name)

  def prepare(self, apply, variables, inputs, labels, key) -> Prepared:
    """The draw (from the first half of `key`); the second half is the dropout key."""
    del apply, variables
    k_mix, k_drop = jax.random.split(key)
    draw = self.draw(k_mix, inputs, labels)
    return Prepared(draw, k_drop, None, {"lam_mean": jnp.mean(draw.coeffs.lam_x)})

  def forward(self, apply, variables, inputs, prepared):
    spec = self.mix_spec(prepared.draw)
    if prepared.encoded is not None:
      return apply.run_head(prepared.encoded, prepared.key, spec)
    return apply(variables, inputs, key=prepared.key, mix=spec)

  def per_example(self, outputs, draw):
    return losses_lib.mixup_loss(self.loss_fn, outputs, draw.targets_a, draw.targets_b,
                                 draw.coeffs.lam_y, self.interpolate)


@dataclasses.dataclass(frozen=True)
class Dirichlet(_Unpaired):
  """k-way mixing as an objective: `x~_i = sum_m w[i, m] x[perm_m[i]]`, `w_i ~ Dir(alpha 1_k)`.

  The draw is `mixing.draw_dirichlet` (`perm_0` the identity, the others
  random permutations; `largest_first` keeps the largest weight on the
  example itself, as big_vision does); targets are smoothed, then mixed with
  the same weights, and the loss is `loss_fn(outputs, mixed targets)` (equal
  to the weighted losses for a target-linear loss). Its `mixing.Draw` holds
  `coeffs = Coefficients(w, w)` with `w` f32[B, k], `perm` int32[k, B], the
  mixed targets as `targets_a` and `targets_b = None`: not the one-partner
  draw AMP and MixupE need, so `mixes` is False and neither wraps it. Inputs
  are mixed at the input (no hidden point); partners are drawn over the whole
  batch (not shard-local), so under a mesh the gather may cross devices.
  alpha, k, largest_first are keyword-only.
  """
  alpha: float = dataclasses.field(kw_only=True)
  k: int = dataclasses.field(kw_only=True)
  largest_first: bool = dataclasses.field(default=False, kw_only=True)

  def __post_init__(self):
    if int(self.k) != self.k or self.k < 2:
      raise ValueError(f"Dirichlet k must be an integer >= 2, got {self.k!r}.")
    sampling.resolve_beta(self.alpha, None)  # alpha > 0.

  def prepare(self, apply, variables, inputs, labels, key) -> Prepared:
    """Weights, partners and mixed targets (first half of `key`); the rest is the dropout key."""
    del apply, variables
    batch = mixing.check_batch(inputs, labels)
    k_mix, k_drop = jax.random.split(key)
    w, perms = mixing.draw_dirichlet(k_mix, batch, alpha=self.alpha, k=int(self.k),
                                     largest_first=self.largest_first)
    targets = mixing.combine(
        mixing.to_targets(labels, self.num_classes, self.label_smoothing), w, perms)
    draw = mixing.Draw(policies.Coefficients(w, w), perms, targets, None)
    return Prepared(draw, k_drop, None, {"lam_mean": jnp.mean(w[:, 0])})

  def forward(self, apply, variables, inputs, prepared):
    d = prepared.draw
    return apply(variables, mixing.combine(inputs, d.coeffs.lam_x, d.perm), key=prepared.key)


@dataclasses.dataclass(frozen=True)
class Wrapper(_Steps):
  """An objective built on `base`: every method and attribute not overridden is the base's.

  Subclass it as a frozen dataclass with `base` as the first field and
  override what the wrapper changes (e.g. `per_example` to add a penalty,
  `prepare` to change the draw). Wrappers nest: `amp(mixupe(...))` is refused
  by `amp`, see each wrapper's docstring for the orders it accepts.
  """
  base: Any

  def __post_init__(self):
    missing = [m for m in ("init", "prepare", "forward", "per_example", "losses")
               if not callable(getattr(self.base, m, None))]
    if missing:
      raise ValueError(f"{type(self).__name__} wraps an objective (mixjax.objectives protocol: "
                       f"init, prepare, forward, per_example, losses), but base "
                       f"{type(self.base).__name__} lacks {missing}.")

  def __getattr__(self, name: str) -> Any:
    if name == "base" or name.startswith("__"):  # Not set yet (copy/pickle): no recursion.
      raise AttributeError(name)
    return getattr(self.base, name)

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    return self.base.init(sample_inputs)

  def prepare(self, apply, variables, inputs, labels, key) -> Prepared:
    return self.base.prepare(apply, variables, inputs, labels, key)

  def forward(self, apply, variables, inputs, prepared):
    return self.base.forward(apply, variables, inputs, prepared)

  def per_example(self, outputs, draw):
    return self.base.per_example(outputs, draw)


def with_lam_x(prepared: Prepared, lam_x: jax.Array) -> Prepared:
  """`prepared` with the input coefficient replaced (the label one stays)."""
  coeffs = prepared.draw.coeffs._replace(lam_x=lam_x)
  return prepared._replace(draw=prepared.draw._replace(coeffs=coeffs))


def erm(loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
        num_classes: Optional[int] = None, label_smoothing: float = 0.0) -> Erm:
  """ERM objective (see `Erm`)."""
  return Erm(loss_fn, num_classes, label_smoothing)


def mixup(policy: policies.Policy, pairing: pairing_lib.Pairing = pairing_lib.random_permutation,
          loss_fn: losses_lib.LossFn = losses_lib.softmax_cross_entropy,
          num_classes: Optional[int] = None, point: Optional[str] = None,
          interpolate: bool = True, label_smoothing: float = 0.0,
          mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data",
          scope: str = "example") -> Mixup:
  """A mixup-family objective (see `Mixup`)."""
  return Mixup(policy, pairing, loss_fn, num_classes, point, interpolate, label_smoothing,
               mesh, axis_name, scope=scope)
