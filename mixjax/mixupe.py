"""MixupE (Zou et al. 2023): mixup plus an explicit first-order directional term.

`mixupe(base)` wraps a mixup-family objective (`objectives.Mixup`) or AMP
(`amp.Amp`) and adds, from a pass over clean (unmixed) examples,

  q^(x_i) = (y_i - g(f(x_i)))^T f(x_i)                  (approximate, default)
  q(x_i)  = (g(f(x_i)) - y_i)^T J_f(x_i) (E[x'] - x_i)  (exact, `exact=True`)
  R = E_{D_lam}[1 - lam] * mean_i |q~(x_i)|
  L = eta_hat * (L_mix + eta * R),  eta_hat = stop_gradient(|L_mix| / |L_mix + eta R|)

`g(f) - y` is the gradient of the per-example loss with respect to the
outputs (softmax(f) - y for softmax cross-entropy, sigmoid(f) - y for the
sigmoid one: the paper's `h(f) - y^T f` losses); the exact term is a
`jax.jvp` of the clean forward pass along `E[x'] - x_i`. `E_{D_lam}[1 - lam]`
comes from `sampling.expected_one_minus_lam(alpha, beta)`. `eta_hat` carries no
gradient: with one, `L` would equal `|L_mix|` and R would drop out.

The clean pass:
- clean_pass='concat' (default, the paper's trick): one forward over the
  mixed batch and the clean examples together (per device shard: the B/S mixed
  rows then the clean rows, so no example leaves its device). The mixed rows
  get the same dropout masks as a pass over the mixed batch alone (linen
  `nn.Dropout` is called on them separately), so `L_mix` is the base's loss.
  batch_stats='mixed' (default): linen `nn.BatchNorm` layers normalise all
  rows with the statistics of the mixed rows and update their running
  statistics from them only (via BatchNorm's `mask`), so the mixed rows see
  exactly what a mixup pass sees and every clean output is a function of its
  own example. batch_stats='all': statistics over all rows (mixed and clean).
  This holds for linen models (through `flax.linen.intercept_methods`) and for
  NNX models run by `objectives.make_nnx_apply`; for other models with batch
  norm or dropout (e.g. a hand-written `apply_fn`) use clean_pass='separate'.
- clean_pass='separate': the mixed pass as the base runs it, then a clean
  pass in training mode (its own batch statistics, the final pass's dropout
  key, new batch statistics discarded). batch_stats must stay 'mixed' (the
  running statistics come from the mixed pass).

`rho` < 1 estimates R from a random `rho` fraction of the clean batch (chosen
inside each of `groups` contiguous groups, by default one per device shard).

E[x'] for the exact term: `mean` is a pytree like one example (a dataset
mean), 'batch' (the current batch mean) or None: a running (cumulative) mean
over all training batches, kept in the model state under the collection
'mixupe' (create it with `init_running_mean`). The JVP runs through the clean
pass as it is computed: with batch_stats='mixed' each clean output depends on
its own example only, so `J_f(x_i)` is the per-example Jacobian; with a
separate clean pass or batch_stats='all' and batch norm in training mode it
also carries the dependence of the batch statistics on the direction.

Cost (benchmarks/methods_overhead.py): R needs the backward pass through the
clean rows too, so MixupE has about twice mixup's FLOPs with rho = 1 (the
paper's 1.3x comes from batching on accelerators); rho = 0.25 cuts the extra
rows to B/4. On CPU one pass over 2B rows can cost more than two over B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixjax import amp as amp_lib
from mixjax import checks
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import objectives
from mixjax import sampling

PyTree = Any
Metrics = dict[str, jax.Array]
CLEAN_PASSES = ("concat", "separate")
BATCH_STATS = ("mixed", "all")
STATE_COLLECTION = "mixupe"


# ----------------------------------------------------------------------------
# The directional terms.


def loss_output_grad(loss_fn: losses_lib.LossFn, outputs: jax.Array, targets: jax.Array
                     ) -> jax.Array:
  """Per-example `d l(f_i, y_i) / d f_i`: f32[B, ...] like `outputs` (softmax(f) - y for CE)."""
  per_example = lambda o: loss_fn(o, targets)  # noqa: E731
  values, vjp = jax.vjp(per_example, outputs.astype(jnp.float32))
  return vjp(jnp.ones_like(values))[0]


def q_approx(loss_fn: losses_lib.LossFn, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """`q^_i = -(dl/df_i)^T f_i` = `(y_i - softmax(f_i))^T f_i` for CE: f32[B]."""
  g = loss_output_grad(loss_fn, outputs, targets)
  f = outputs.astype(jnp.float32)
  return -jnp.sum((g * f).reshape(f.shape[0], -1), axis=-1)


def q_exact(loss_fn: losses_lib.LossFn, outputs: jax.Array, outputs_dot: jax.Array,
            targets: jax.Array) -> jax.Array:
  """`q_i = (dl/df_i)^T J_f(x_i) d_i` from `outputs_dot = J_f(x_i) d_i` (a JVP): f32[B]."""
  g = loss_output_grad(loss_fn, outputs, targets)
  jd = outputs_dot.astype(jnp.float32)
  return jnp.sum((g * jd).reshape(jd.shape[0], -1), axis=-1)


def regularizer(q: jax.Array, alpha: float, beta: Optional[float] = None) -> jax.Array:
  """`R = E_{D_lam}[1 - lam] * mean |q|` (D_lam of Beta(alpha, beta)): f32[]."""
  return sampling.expected_one_minus_lam(alpha, beta) * jnp.mean(jnp.abs(q))


def combine(loss_mix: jax.Array, reg: jax.Array, eta: float) -> tuple[jax.Array, jax.Array]:
  """`(eta_hat * (L_mix + eta R), eta_hat)` with `eta_hat = sg(|L_mix| / |L_mix + eta R|)`."""
  total = loss_mix + eta * reg
  den = jnp.abs(total)
  eta_hat = jnp.where(den > 0, jnp.abs(loss_mix) / jnp.where(den > 0, den, 1.0), 1.0)
  eta_hat = jax.lax.stop_gradient(eta_hat)
  return eta_hat * total, eta_hat


def init_running_mean(sample_inputs: PyTree) -> dict[str, PyTree]:
  """`{'mixupe': {'mean': zeros like one example (f32), 'count': f32[]}}`.

  Merge it into the model state (`variables = {'params': ..., **model_state,
  **init_running_mean(x)}`) to let `mixupe(..., exact=True, mean=None)` keep
  a running mean of the training inputs (E[x']).
  """
  checks.float_leaves("sample_inputs", sample_inputs)
  mean = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x)[1:], jnp.float32), sample_inputs)
  return {STATE_COLLECTION: {"mean": mean, "count": jnp.zeros((), jnp.float32)}}


def _batch_mean(inputs):
  return jax.tree_util.tree_map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0), inputs)


def update_running_mean(state: PyTree, inputs: PyTree) -> PyTree:
  """Cumulative mean over all examples seen: the new `{'mean', 'count'}`."""
  batch = checks.batch_size("inputs", inputs)
  count = state["count"] + batch
  w = batch / count
  mean = jax.tree_util.tree_map(lambda m, b: m + w * (b - m), state["mean"], _batch_mean(inputs))
  return {"mean": mean, "count": count}


# ----------------------------------------------------------------------------
# Row layout of the concatenated pass: per group, the mixed rows then the clean rows.


def interleave(a: PyTree, b: PyTree, groups: int) -> PyTree:
  """Leaves a[S*n, ...], b[S*m, ...] -> [S*(n+m), ...]: group s = a's rows of s, then b's."""
  def leaf(u, v):
    u = u.reshape((groups, -1) + u.shape[1:])
    v = v.reshape((groups, -1) + v.shape[1:]).astype(u.dtype)
    w = jnp.concatenate([u, v], axis=1)
    return w.reshape((-1,) + w.shape[2:])
  return jax.tree_util.tree_map(leaf, a, b)


def deinterleave(c: PyTree, groups: int, n: int) -> tuple[PyTree, PyTree]:
  """Inverse of `interleave` (n = rows of `a` per group)."""
  def leaf(w):
    w = w.reshape((groups, -1) + w.shape[1:])
    return (w[:, :n].reshape((-1,) + w.shape[2:]), w[:, n:].reshape((-1,) + w.shape[2:]))
  pairs = jax.tree_util.tree_map(leaf, c)
  outer = jax.tree_util.tree_structure(c)
  inner = jax.tree_util.tree_structure((0, 0))
  return jax.tree_util.tree_transpose(outer, inner, pairs)


def _positions(idx: jax.Array, rows: int, groups: int, offset: int, size: int) -> jax.Array:
  """Row of example `idx` (of a block with `rows` rows per group) in the interleaved layout."""
  return (idx // rows) * size + offset + idx % rows


class _Layout:
  """Index bookkeeping for B mixed rows and K clean rows in `groups` groups."""

  def __init__(self, batch: int, clean: int, groups: int):
    self.groups, self.n, self.m = groups, batch // groups, clean // groups
    self.size = self.n + self.m
    self.mixed_rows = interleave(jnp.ones(batch, bool), jnp.zeros(clean, bool), groups)

  def spec(self, spec: objectives.MixSpec) -> objectives.MixSpec:
    perm = _positions(spec.perm, self.n, self.groups, 0, self.size)
    own = _positions(jnp.arange(self.groups * self.m), self.m, self.groups, self.n, self.size)
    lam = jnp.broadcast_to(jnp.asarray(spec.lam, jnp.float32), (self.groups * self.n,))
    return spec._replace(lam=interleave(lam, jnp.ones(self.groups * self.m), self.groups),
                         perm=interleave(perm.astype(jnp.int32), own.astype(jnp.int32),
                                         self.groups))

  def split(self, c: PyTree) -> tuple[PyTree, PyTree]:
    return deinterleave(c, self.groups, self.n)


@contextlib.contextmanager
def _mixed_rows_only(layout: _Layout, batch_stats: str, clean_key: jax.Array):
  """BatchNorm: statistics of the mixed rows; Dropout: mixed rows as if alone.

  Applies to linen `nn.BatchNorm` / `nn.Dropout` (through `nn.intercept_methods`)
  and to NNX `nnx.BatchNorm` / `nnx.Dropout` of models run by
  `objectives.make_nnx_apply` (through `objectives.nnx_call_hook`).
  """
  total = layout.groups * layout.size
  calls = [0]

  def rows(kind, next_fun, args, kwargs, rng_kwarg):
    x = args[0] if args else None
    if not hasattr(x, "shape") or not x.shape or x.shape[0] != total:
      return next_fun(*args, **kwargs)
    if kind == "batch_norm" and batch_stats == "mixed":
      mask = layout.mixed_rows.reshape((total,) + (1,) * (x.ndim - 1))
      if kwargs.get("mask") is not None:
        mask = jnp.logical_and(mask, kwargs["mask"])
      return next_fun(*args, **{**kwargs, "mask": mask})
    if kind == "dropout":
      a, b = layout.split(x)
      out_a = next_fun(a, *args[1:], **kwargs)
      calls[0] += 1
      out_b = next_fun(b, *args[1:], **{**kwargs,
                                        rng_kwarg: jax.random.fold_in(clean_key, calls[0])})
      return interleave(out_a, out_b, layout.groups)
    return next_fun(*args, **kwargs)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    kind = ("batch_norm" if isinstance(context.module, nn.BatchNorm) else
            "dropout" if isinstance(context.module, nn.Dropout) else None)
    return rows(kind, next_fun, args, kwargs, "rng")

  with nn.intercept_methods(interceptor), objectives.nnx_call_hook(
      lambda model: _nnx_rows(model, rows)):
    yield


@contextlib.contextmanager
def _nnx_rows(model: Any, rows: Callable[..., Any]):
  """Routes the calls of the NNX BatchNorm and Dropout layers of `model` through `rows`."""
  from flax import nnx
  swapped = []
  walk = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
  for _, sub in walk:
    kind = ("batch_norm" if isinstance(sub, nnx.BatchNorm) else
            "dropout" if isinstance(sub, nnx.Dropout) else None)
    if kind is not None:
      swapped.append((sub, type(sub)))
      sub.__class__ = _routed_class(type(sub), kind)
  _NNX_ROWS.append(rows)
  try:
    yield
  finally:
    _NNX_ROWS.pop()
    for sub, cls in swapped:
      sub.__class__ = cls


_NNX_ROWS: list[Callable[..., Any]] = []  # The innermost active `rows` of `_nnx_rows`.


@functools.cache
def _routed_class(cls: type, kind: str) -> type:
  """A subclass of an NNX layer class whose `__call__` goes through the active `rows`."""

  def __call__(self, *args, **kwargs):
    return _NNX_ROWS[-1](kind, functools.partial(cls.__call__, self), args, kwargs, "rngs")

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


SUBSET_SALT = 0x6D78  # The clean subset is drawn with key fold_in(step key, SUBSET_SALT).


def clean_subset(key: jax.Array, batch: int, groups: int, rho: float) -> Optional[jax.Array]:
  """Indices of `round(rho * B / groups)` random examples of each group (None for rho == 1).

  Group `g` holds examples `g*n .. (g+1)*n - 1` (n = B / groups) and draws with
  `fold_in(key, g)`; the result, int32[K], lists group 0's picks first.
  """
  if rho == 1.0:
    return None
  n = batch // groups
  k = max(1, int(round(rho * n)))
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(groups))
  local = jax.vmap(lambda kk: jax.random.permutation(kk, n)[:k])(keys)
  return (local + n * jnp.arange(groups)[:, None]).reshape(-1).astype(jnp.int32)


def _take_rows(tree: PyTree, idx: jax.Array, rows_per_shard: int, mesh, axis_name) -> PyTree:
  """`tree[idx]` with `idx` grouped by shard; with a mesh the gather stays on each shard."""
  gather = lambda t, i: jax.tree_util.tree_map(  # noqa: E731
      lambda x: jnp.take(x, i, axis=0, mode="clip"), t)
  if mesh is None:
    return gather(tree, idx)

  def body(t, i):
    return gather(t, i - jax.lax.axis_index(axis_name) * rows_per_shard)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                       out_specs=P(axis_name))(tree, idx)


# ----------------------------------------------------------------------------
# The objective.


@dataclasses.dataclass(frozen=True)
class MixupE:
  """MixupE around a `Mixup` or an `Amp` objective (see the module docstring).

  alpha, beta: the Beta(alpha, beta) of the mixing policy (for E[1 - lam]).
  eta: weight of R (the paper: 1e-3 for most image runs).
  exact: use q (a JVP along E[x'] - x_i, float inputs) instead of q^.
  mean: E[x'] for `exact`: a pytree like one example, 'batch', or None (running mean).
  clean_pass: 'concat' or 'separate'; batch_stats: 'mixed' or 'all' (concat only).
  rho: fraction of the clean batch R is estimated on, in (0, 1].
  groups: groups for the clean subset and the concatenated layout (default:
    the base's mesh shards along its axis, else 1).
  """
  base: Any
  alpha: float = 1.0
  beta: Optional[float] = None
  eta: float = 1e-3
  exact: bool = False
  mean: Union[None, str, PyTree] = None
  clean_pass: str = "concat"
  batch_stats: str = "mixed"
  rho: float = 1.0
  groups: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.base, (objectives.Mixup, amp_lib.Amp)):
      raise ValueError(f"mixupe wraps a mixup-family objective (objectives.Mixup or amp.Amp), "
                       f"got {type(self.base).__name__}.")
    sampling.expected_one_minus_lam(self.alpha, self.beta)  # Validates alpha and beta.
    try:
      eta = float(self.eta)
    except (TypeError, ValueError):
      raise ValueError(f"eta must be a number >= 0, got {self.eta!r}.") from None
    if not math.isfinite(eta) or eta < 0:
      raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}.")
    if self.clean_pass not in CLEAN_PASSES:
      raise ValueError(f"clean_pass must be one of {list(CLEAN_PASSES)}, got {self.clean_pass!r}.")
    if self.batch_stats not in BATCH_STATS:
      raise ValueError(f"batch_stats must be one of {list(BATCH_STATS)}, got "
                       f"{self.batch_stats!r}.")
    if self.clean_pass == "separate" and self.batch_stats != "mixed":
      raise ValueError("batch_stats='all' needs clean_pass='concat' (a separate clean pass "
                       "normalises with its own statistics and does not update them).")
    if not (isinstance(self.rho, (int, float)) and 0.0 < self.rho <= 1.0):
      raise ValueError(f"rho must be a number in (0, 1], got {self.rho!r}.")
    if isinstance(self.mean, str) and self.mean != "batch":
      raise ValueError(f"mean must be a pytree like one example, 'batch' or None (running "
                       f"mean), got {self.mean!r}.")
    if self.groups is not None and (int(self.groups) != self.groups or self.groups < 1):
      raise ValueError(f"groups must be a positive integer or None, got {self.groups!r}.")

  @property
  def to_logits(self) -> Callable[[jax.Array], jax.Array]:
    return self.mixup.to_logits

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """The base's collections, plus the running mean of the inputs for exact q with mean=None."""
    state = dict(self.base.init(sample_inputs))
    if self.exact and self.mean is None:
      state.update(init_running_mean(sample_inputs))
    return state

  @property
  def mixup(self) -> objectives.Mixup:
    return amp_lib.mixup_base(self.base)

  def _groups(self) -> int:
    m = self.mixup
    shards = mixing.num_shards(m.mesh, m.axis_name) if m.mesh is not None else None
    if self.groups is not None and shards is not None and int(self.groups) != shards:
      raise ValueError(f"groups={self.groups} must equal the {shards} shards of the mesh axis "
                       f"{m.axis_name!r} (or be None).")
    if self.groups is not None:
      return int(self.groups)
    return shards or 1

  def _direction(self, running, inputs):
    """(E[x'] pytree, new running state or None)."""
    if isinstance(self.mean, str):
      return _batch_mean(inputs), None
    if self.mean is not None:
      return self.mean, None
    if running is None:
      raise ValueError("mixupe(exact=True, mean=None) keeps a running mean of the inputs in the "
                       "model state: add mixupe.init_running_mean(sample_inputs) to the "
                       "variables, or pass mean=<dataset mean> or mean='batch'.")
    state = update_running_mean(running, inputs)
    return jax.lax.stop_gradient(state["mean"]), state

  def __call__(self, apply, variables, inputs, labels, key):
    base = self.mixup
    variables = dict(variables)
    running = variables.pop(STATE_COLLECTION, None)
    model_vars = variables
    prepared = amp_lib.prepare(self.base, apply, model_vars, inputs, labels, key)
    draw = prepared.draw
    batch = checks.batch_size("inputs", inputs)
    groups = self._groups()
    if batch % groups:
      raise ValueError(f"batch size {batch} is not divisible by groups={groups}.")
    idx = clean_subset(jax.random.fold_in(key, SUBSET_SALT), batch, groups, self.rho)
    clean = inputs if idx is None else _take_rows(inputs, idx, batch // groups, base.mesh,
                                                  base.axis_name)
    targets = draw.targets_a if idx is None else _take_rows(
        draw.targets_a, idx, batch // groups, base.mesh, base.axis_name)

    new_running = None
    tangent = None
    if self.exact:
      checks.float_leaves("inputs (exact MixupE)", inputs)
      mean, new_running = self._direction(running, inputs)
      tangent = jax.tree_util.tree_map(lambda m, x: (m[None] - x.astype(jnp.float32)).astype(
          x.dtype), mean, clean)

    if self.clean_pass == "separate":
      per_example, _, state = amp_lib.final_losses(base, apply, model_vars, inputs, prepared)
      run = lambda xc: apply(model_vars, xc, key=prepared.key)  # noqa: E731
      if tangent is None:
        out_c, _ = run(clean)
        out_dot = None
      else:
        out_c, out_dot, _ = jax.jvp(run, (clean,), (tangent,), has_aux=True)
    else:
      per_example, out_c, out_dot, state = self._concat_pass(
          apply, model_vars, inputs, clean, idx, tangent, prepared, groups)

    if tangent is None:
      q = q_approx(base.loss_fn, out_c, targets)
    else:
      q = q_exact(base.loss_fn, out_c, out_dot, targets)
    loss_mix = jnp.mean(per_example)
    reg = regularizer(q, self.alpha, self.beta)
    loss, eta_hat = combine(loss_mix, reg, self.eta)
    if new_running is not None:
      state = {**dict(state), STATE_COLLECTION: new_running}
    elif running is not None:
      state = {**dict(state), STATE_COLLECTION: running}
    metrics = {**prepared.metrics, "loss": loss, "loss_mix": loss_mix, "mixupe_r": reg,
               "mixupe_q_abs": jnp.mean(jnp.abs(q)), "mixupe_eta_hat": eta_hat}
    return loss, (state, jax.lax.stop_gradient(metrics))

  def _concat_pass(self, apply, variables, inputs, clean, idx, tangent, prepared, groups):
    """One forward over [mixed; clean] rows: (per-example L_mix, clean outputs, JVP, state)."""
    base = self.mixup
    draw = prepared.draw
    batch = checks.batch_size("inputs", inputs)
    k = checks.batch_size("clean inputs", clean)
    layout = _Layout(batch, k, groups)
    clean_key = jax.random.fold_in(prepared.key, 0x636C)
    ctx = lambda: _mixed_rows_only(layout, self.batch_stats, clean_key)  # noqa: E731

    if prepared.encoded is not None and tangent is None:
      # AMP on a split model: the encoder ran once; concatenate at the split point.
      enc = prepared.encoded
      spec = draw.spec
      hm = mixing.mix_with_partner(enc.h, spec.perm, spec.lam, mesh=spec.mesh,
                                   axis_name=spec.axis_name)
      h_clean = enc.h if idx is None else _take_rows(enc.h, idx, batch // groups, spec.mesh,
                                                     spec.axis_name)
      with ctx():
        out, head_state = apply.head(enc.head_variables, interleave(hm, h_clean, groups),
                                     key=prepared.key)
      state = {**enc.state, **dict(head_state)}
      out_m, out_c = layout.split(out)
      out_dot = None
    else:
      spec = layout.spec(draw.spec)

      def run(xc):
        with ctx():
          out, state = apply(variables, interleave(inputs, xc, groups), key=prepared.key,
                             mix=spec)
        return out, state

      if tangent is None:
        out, state = run(clean)
        out_m, out_c = layout.split(out)
        out_dot = None
      else:
        out, out_dot_all, state = jax.jvp(run, (clean,), (tangent,), has_aux=True)
        out_m, out_c = layout.split(out)
        out_dot = layout.split(out_dot_all)[1]
    per_example = losses_lib.mixup_loss(base.loss_fn, out_m, draw.targets_a, draw.targets_b,
                                        draw.coeffs.lam_y, base.interpolate)
    return per_example, out_c, out_dot, state


def mixupe(objective: Any, alpha: Optional[float] = None, beta: Optional[float] = None,
           eta: float = 1e-3, exact: bool = False, mean: Union[None, str, PyTree] = None,
           clean_pass: str = "concat", batch_stats: str = "mixed", rho: float = 1.0,
           groups: Optional[int] = None) -> MixupE:
  """MixupE around a `Mixup` or `Amp` objective (see `MixupE`).

  `alpha`, `beta`: the Beta(alpha, beta) of the mixing policy, for
  E_{D_lam}[1 - lam]; by default read from the policy's `beta_params`.
  """
  base = amp_lib.mixup_base(objective)
  if alpha is None and isinstance(base, objectives.Mixup):  # Other objectives fail in MixupE.
    params = getattr(base.policy, "beta_params", None)
    if params is None:
      raise ValueError("mixupe needs alpha (and beta) of the mixing policy's Beta(alpha, beta): "
                       "this policy does not carry `beta_params`, so pass them explicitly.")
    alpha, beta = params
  return MixupE(objective, alpha, beta, eta, exact, mean, clean_pass, batch_stats, rho, groups)
