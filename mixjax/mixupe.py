"""MixupE (Zou et al. 2023): mixup plus an explicit first-order directional term.

`mixupe(base)` wraps any objective whose loss is a mean of per-example
losses (`base.decomposes`: mixup, Untied MixUp, DAT, AMP around them, ERM as
in the paper's Table 7, or a user's `objectives.Wrapper`) and adds, from a
pass over clean (unmixed) examples,

  q^(x_i) = (y_i - g(f(x_i)))^T f(x_i)                  (approximate, default)
  q(x_i)  = (g(f(x_i)) - y_i)^T J_f(x_i) (E[x'] - x_i)  (exact, `exact=True`)
  R = w * mean_i |q~(x_i)|,  w = the policy's first-order weight
  L = eta_hat * (L_mix + eta * R),  eta_hat = stop_gradient(|L_mix| / |L_mix + eta R|)

The approximation q^ holds for losses of the form `h(f) - y^T f`; for a
scale-invariant loss (the negative cosine) q^ is identically zero, so MixupE
refuses it there unless `exact=True` (q is a directional derivative, defined
for any differentiable loss). `g(f) - y` is the gradient of the per-example
loss with respect to the outputs (softmax(f) - y for softmax cross-entropy, sigmoid(f) - y for the
sigmoid one: the paper's `h(f) - y^T f` losses); the exact term is a
`jax.jvp` of the clean forward pass along `E[x'] - x_i`. `eta_hat` carries no
gradient: with one, `L` would equal `|L_mix|` and R would drop out.

The weight `w` is the expected coefficient of the partner once the mixed loss
is written with each example's own label (`policy.first_order_weight()`, see
`mixjax.policies`). For mixup with Beta(a, b) it is the paper's
`E_{D_lam}[1 - lam] = 2ab / ((a+b)(a+b+1))`; the paper applies the same
`E_{D_lam}` to every base, but for Untied MixUp U(Beta(a, b)) and DAT with
Beta(a, b) the first-order term of their loss is weighted by
`E_{Beta(a,b)}[1 - lam] = b / (a + b)` (the Untied MixUp paper's Lemma 4:
0.290 instead of 0.312 for U(Beta(2.2, 0.9)), 0.5 instead of 1/3 for DAT
with Beta(1, 1)), which is what mixjax uses.

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
  NNX models run by `adapters.make_nnx_apply` (`adapters.mixed_rows_only`); for other models with batch
  norm or dropout (e.g. a hand-written `apply_fn`) use clean_pass='separate'.
  With `exact=True` and batch_stats='mixed' no mixed output depends on the
  clean rows, so the concatenated pass runs as the mixed pass, recording each
  batch norm's input, then the clean rows alone with the JVP, each batch norm
  normalising them with the recorded mixed rows' statistics
  (`adapters.recording_batch_norm`, `adapters.clean_rows_only`): the same
  numbers and gradient, without carrying zero tangents through the mixed rows.
- clean_pass='separate': the mixed pass as the base runs it, then a clean
  pass in training mode (its own batch statistics, the final pass's dropout
  key, new batch statistics discarded). batch_stats must stay 'mixed' (the
  running statistics come from the mixed pass).

`rho` < 1 estimates R from a random `rho` fraction of the clean batch (chosen
inside each of `groups` contiguous groups, by default one per device shard).

E[x'] for the exact term: `mean` is a pytree like one example (a dataset
mean), 'batch' (the current batch mean) or None: a running (cumulative) mean
over all training batches, kept in the model state under the collection
'mixupe' (created by the objective's `init(sample_inputs)`). The JVP runs through the clean
pass as it is computed: with batch_stats='mixed' each clean output depends on
its own example only, so `J_f(x_i)` is the per-example Jacobian; with a
separate clean pass or batch_stats='all' and batch norm in training mode it
also carries the dependence of the batch statistics on the direction.

Variants. variant='paper' (the default) is the paper's term above.
variant='released' is the authors' released code's recommended version
(github.com/oneHuster/MixupE: the README's `--mixupe_version 3`,
`mixup.py`'s `training_method`), for matching their published numbers; where
the two differ the paper's is the default. The released term is signed and
thresholded instead of an absolute value:

  R_rel = -w * sum_{i: q^_i < threshold} q^_i / K,   L = eta_hat * (L_mix + eta * R_rel)

over the K clean rows (K = B for rho = 1; the code divides by the whole batch
size, not by the number of selected rows), with the same `q^`, weight `w`
(the code's `1 - beta_mean(alpha + 1, alpha)` = E_{D_lam}[1 - lam] for its
Beta(alpha, alpha)) and `eta_hat` (no gradient) as the paper variant. For
`q^_i < 0` the summand is `|q^_i|`, as in the paper; rows with
`0 <= q^_i < threshold` lower the loss, and rows with `q^_i >= threshold` are
left out. `q^` carries its gradient through the softmax (the code does not
detach it in version 3). `threshold` defaults to 1.0, the README's command
(`main.py`'s own default is -1.0). The released variant takes the
approximate `q^` only (`exact=True` is refused: the code's exact version 1
adds `+eta * sum_{q < threshold} q`, of the opposite sign to version 3, and
the README recommends version 3). Not copied: the code's clean pass is a
separate forward in training mode with fresh dropout masks, whose batch norm
updates the running statistics a second time (`clean_pass='separate'` is the
closest: its own batch statistics, not kept); `clean_pass` and `batch_stats`
keep their meaning here. The code's `q^` uses the hard labels; here the
base's targets (label-smoothed if the base smooths).

Cost (benchmarks/methods_overhead.py): R needs the backward pass through the
clean rows too, so MixupE has about twice mixup's FLOPs with rho = 1 (the
paper's 1.3x comes from batching on accelerators), and the exact term's JVP
(forward and backward) about one more: 3x ERM; rho = 0.25 cuts the extra
rows to B/4. On CPU one pass over 2B rows can cost more than two over B.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixjax import adapters
from mixjax import checks
from mixjax import losses as losses_lib
from mixjax import mixing
from mixjax import objectives
from mixjax import sampling

PyTree = Any
Metrics = dict[str, jax.Array]
CLEAN_PASSES = ("concat", "separate")
BATCH_STATS = ("mixed", "all")
VARIANTS = ("paper", "released")
STATE_COLLECTION = "mixupe"
RELEASED_THRESHOLD = 1.0  # The README's --threshold.


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


def regularizer(q: jax.Array, weight: float) -> jax.Array:
  """`R = weight * mean |q|`: f32[]. `weight` is the policy's first-order weight

  (`policy.first_order_weight()`: `E_{D_lam}[1 - lam]` for mixup with Beta(a, b),
  `b / (a + b)` for Untied MixUp U(Beta(a, b)) and DAT).
  """
  return weight * jnp.mean(jnp.abs(q))


def released_regularizer(q: jax.Array, weight: float, threshold: float) -> jax.Array:
  """`R_rel = -weight * sum_{q_i < threshold} q_i / K` for q f32[K]: f32[] (signed).

  The released code's version 3 (module docstring, "Variants"); `combine`
  adds it as `L_mix + eta * R_rel`.
  """
  selected = jnp.where(q < threshold, q, 0.0)
  return -weight * jnp.sum(selected) / q.shape[0]


def combine(loss_mix: jax.Array, reg: jax.Array, eta: float) -> tuple[jax.Array, jax.Array]:
  """`(eta_hat * (L_mix + eta R), eta_hat)` with `eta_hat = sg(|L_mix| / |L_mix + eta R|)`."""
  total = loss_mix + eta * reg
  den = jnp.abs(total)
  eta_hat = jnp.where(den > 0, jnp.abs(loss_mix) / jnp.where(den > 0, den, 1.0), 1.0)
  eta_hat = jax.lax.stop_gradient(eta_hat)
  return eta_hat * total, eta_hat


def _init_running_mean(sample_inputs: PyTree) -> dict[str, PyTree]:
  """`{'mixupe': {'mean': zeros like one example (f32), 'count': f32[]}}`.

  `MixupE.init` returns it for `exact=True, mean=None` (the running mean of
  the training inputs, E[x']).
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


SUBSET_SALT = 0x6D78  # The clean subset is drawn with key fold_in(step key, SUBSET_SALT).
CLEAN_DROPOUT_SALT = 0x636C  # Clean rows' dropout: fold_in(final pass key, this salt).


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


def _with_clean_rows(tree: PyTree, idx: Optional[jax.Array], batch: int, groups: int, mesh,
                     axis_name) -> PyTree:
  """`interleave(x, x[idx])` for each leaf of `tree` with `batch` leading rows (others as they are).

  The [mixed; clean] layout of a value the layers below the mixing point
  computed on the batch (idx None: every example is a clean row).
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  at = [i for i, x in enumerate(leaves) if getattr(x, "ndim", 0) and x.shape[0] == batch]
  rows = [leaves[i] for i in at]
  if not rows:
    return tree
  clean = rows if idx is None else _take_rows(rows, idx, batch // groups, mesh, axis_name)
  for i, x in zip(at, adapters.interleave(rows, clean, groups)):
    leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------
# The objective.


@dataclasses.dataclass(frozen=True)
class MixupE(objectives.Wrapper):
  """MixupE around any objective whose loss is a per-example mean (see the module docstring).

  base: `base.decomposes` (mixup, Untied MixUp, DAT, AMP around them, ERM
    (the paper's Table 7 "ERM + additional loss"), or a user's `Wrapper`).
  weight: the first-order weight of R, in [0, 1] (`mixupe()` reads it from
    the base's policy: `policy.first_order_weight()`).
  eta: weight of R (the paper: 1e-3 for most image runs).
  exact: use q (a JVP along E[x'] - x_i, float inputs) instead of q^.
  mean: E[x'] for `exact`: a pytree like one example, 'batch', or None (running mean).
  clean_pass: 'concat' or 'separate'; batch_stats: 'mixed' or 'all' (concat only).
  rho: fraction of the clean batch R is estimated on, in (0, 1].
  groups: groups for the clean subset and the concatenated layout (default:
    the base's mesh shards along its axis, else 1).
  variant: 'paper' (the paper's `R = w mean |q~|`, default) or 'released'
    (the authors' code, version 3: `-w sum_{q^ < threshold} q^ / K`; see the
    module docstring).
  threshold: the released variant's threshold on q^ (the README's 1.0).
  """
  weight: float = 0.5
  eta: float = 1e-3
  exact: bool = False
  mean: Union[None, str, PyTree] = None
  clean_pass: str = "concat"
  batch_stats: str = "mixed"
  rho: float = 1.0
  groups: Optional[int] = None
  variant: str = "paper"
  threshold: float = RELEASED_THRESHOLD

  decomposes = False  # eta_hat * (L_mix + eta R) is not a per-example mean.

  def __post_init__(self):
    super().__post_init__()
    if not getattr(self.base, "decomposes", False):
      raise ValueError(f"mixupe adds its term to a loss that is a mean of per-example losses; "
                       f"{type(self.base).__name__}'s is not (mixupe is applied once, "
                       f"outermost: mixupe(amp(base))).")
    if not (isinstance(self.weight, (int, float)) and 0.0 <= self.weight <= 1.0):
      raise ValueError(f"weight (the first-order weight E[1 - lam]) must be a number in [0, 1], "
                       f"got {self.weight!r}.")
    if not self.exact and getattr(self.base.loss_fn, "scale_invariant", False):
      raise ValueError(
          "mixupe's approximate term q^ = -(dl/df)^T f is identically zero for a scale-invariant "
          "loss such as the negative cosine (its gradient is orthogonal to f), so it would add "
          "nothing: use exact=True (q, the directional derivative along E[x'] - x, a JVP) or a "
          "cross-entropy loss.")
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
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {list(VARIANTS)} ('paper': the MixupE paper's "
                       f"term, 'released': the authors' released code, version 3), got "
                       f"{self.variant!r}.")
    if self.variant == "released" and self.exact:
      raise ValueError("variant='released' is the released code's version 3, which uses the "
                       "approximate q^; use exact=False (or variant='paper' for the exact q).")
    if (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
        or not math.isfinite(self.threshold)):
      raise ValueError(f"threshold must be a finite number, got {self.threshold!r}.")

  def init(self, sample_inputs: PyTree) -> dict[str, PyTree]:
    """The base's collections, plus the running mean of the inputs for exact q with mean=None."""
    state = dict(self.base.init(sample_inputs))
    if self.exact and self.mean is None:
      state.update(_init_running_mean(sample_inputs))
    return state

  def _groups(self) -> int:
    mesh, axis = self.base.mesh, self.base.axis_name
    shards = mixing.num_shards(mesh, axis) if mesh is not None else None
    if self.groups is not None and shards is not None and int(self.groups) != shards:
      raise ValueError(f"groups={self.groups} must equal the {shards} shards of the mesh axis "
                       f"{axis!r} (or be None).")
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
                       "model state: merge objective.init(sample_inputs) into the variables, or "
                       "pass mean=<dataset mean> or mean='batch'.")
    state = update_running_mean(running, inputs)
    return jax.lax.stop_gradient(state["mean"]), state

  def __call__(self, apply, variables, inputs, labels, key):
    base = self.base
    mesh, axis = base.mesh, base.axis_name
    variables = dict(variables)
    running = variables.pop(STATE_COLLECTION, None)
    model_vars = variables
    prepared = base.prepare(apply, model_vars, inputs, labels, key)
    draw = prepared.draw
    batch = checks.batch_size("inputs", inputs)
    groups = self._groups()
    if batch % groups:
      raise ValueError(f"batch size {batch} is not divisible by groups={groups}.")
    idx = clean_subset(jax.random.fold_in(key, SUBSET_SALT), batch, groups, self.rho)
    clean = inputs if idx is None else _take_rows(inputs, idx, batch // groups, mesh, axis)
    targets = draw.targets_a if idx is None else _take_rows(
        draw.targets_a, idx, batch // groups, mesh, axis)

    new_running = None
    tangent = None
    if self.exact:
      checks.float_leaves("inputs (exact MixupE)", inputs)
      mean, new_running = self._direction(running, inputs)
      tangent = jax.tree_util.tree_map(lambda m, x: (m[None] - x.astype(jnp.float32)).astype(
          x.dtype), mean, clean)

    if self.clean_pass == "separate":
      per_example, _, state = base.losses(apply, model_vars, inputs, prepared)
      run = lambda xc: apply(model_vars, xc, key=prepared.key)  # noqa: E731
      if tangent is None:
        out_c, _ = run(clean)
        out_dot = None
      else:
        out_c, out_dot, _ = jax.jvp(run, (clean,), (tangent,), has_aux=True)
    elif tangent is not None and self.batch_stats == "mixed":
      per_example, out_c, out_dot, state = self._clean_jvp_pass(
          apply, model_vars, inputs, clean, tangent, prepared, groups)
    else:
      per_example, out_c, out_dot, state = self._concat_pass(
          apply, model_vars, inputs, clean, idx, tangent, prepared, groups)

    if tangent is None:
      q = q_approx(base.loss_fn, out_c, targets)
    else:
      q = q_exact(base.loss_fn, out_c, out_dot, targets)
    loss_mix = jnp.mean(per_example)
    if self.variant == "released":
      reg = released_regularizer(q, self.weight, self.threshold)
    else:
      reg = regularizer(q, self.weight)
    loss, eta_hat = combine(loss_mix, reg, self.eta)
    # Collections the base's prepare updated (AMP's released window) join the new state.
    state = {**dict(state), **getattr(draw, "state", {})}
    if new_running is not None:
      state = {**dict(state), STATE_COLLECTION: new_running}
    elif running is not None:
      state = {**dict(state), STATE_COLLECTION: running}
    metrics = {**prepared.metrics, "loss": loss, "loss_mix": loss_mix, "mixupe_r": reg,
               "mixupe_q_abs": jnp.mean(jnp.abs(q)), "mixupe_eta_hat": eta_hat}
    if self.variant == "released":
      metrics["mixupe_selected_frac"] = jnp.mean((q < self.threshold).astype(jnp.float32))
    return loss, (state, jax.lax.stop_gradient(metrics))

  def _concat_pass(self, apply, variables, inputs, clean, idx, tangent, prepared, groups):
    """One forward over [mixed; clean] rows: (per-example L_mix, clean outputs, JVP, state).

    When AMP's encoder already ran (`prepared.encoded`: a `SplitApply` at its
    point, or an unmodified linen or NNX model at any hidden point) and no JVP
    is needed, the pass starts at the mixing point: the clean rows' values
    below it are the encoder's rows of the clean examples (the values the
    concatenated pass computes there, since below the point a mixed row is its
    unmixed example and every row is normalised with the mixed rows'
    statistics), so only the layers above the point run on [mixed; clean]
    rows. Dropout below the point then gives a clean row its example's
    encoder masks instead of masks of its own. With batch_stats='all' and
    rho < 1 the clean rows would change the statistics below the point, so
    the whole model runs on [mixed; clean] rows.
    """
    base = self.base
    draw = prepared.draw
    batch = checks.batch_size("inputs", inputs)
    k = checks.batch_size("clean inputs", clean)
    layout = adapters.RowLayout.of(batch, k, groups)
    clean_key = jax.random.fold_in(prepared.key, CLEAN_DROPOUT_SALT)
    ctx = lambda: adapters.mixed_rows_only(layout, self.batch_stats, clean_key)  # noqa: E731
    spec = base.mix_spec(draw) if base.mixes else None

    enc = prepared.encoded
    if (enc is not None and tangent is None and spec is not None
        and (idx is None or self.batch_stats == "mixed")):
      # AMP's encoder ran once: the pass starts at its point (any split or unsplit model).
      h, below, inputs_rows = _with_clean_rows((enc.h, enc.below, enc.inputs), idx, batch,
                                               groups, base.mesh, base.axis_name)
      both = enc._replace(h=h, below=tuple(below), inputs=inputs_rows)
      out, state = apply.run_head(both, prepared.key, layout.spec(spec), within=ctx)
      out_m, out_c = layout.split(out)
      out_dot = None
    else:
      row_spec = None if spec is None else layout.spec(spec)

      def run(xc):
        with ctx():
          out, state = apply(variables, adapters.interleave(inputs, xc, groups),
                             key=prepared.key, mix=row_spec)
        return out, state

      if tangent is None:
        out, state = run(clean)
        out_m, out_c = layout.split(out)
        out_dot = None
      else:
        out, out_dot_all, state = jax.jvp(run, (clean,), (tangent,), has_aux=True)
        out_m, out_c = layout.split(out)
        out_dot = layout.split(out_dot_all)[1]
    return base.per_example(out_m, draw), out_c, out_dot, state


  def _clean_jvp_pass(self, apply, variables, inputs, clean, tangent, prepared, groups):
    """The concatenated pass with batch_stats='mixed', as a mixed pass and a clean pass.

    With batch_stats='mixed' no mixed output depends on the clean rows, so the
    concatenated pass's JVP carries exact zeros through the mixed rows. Here
    the mixed rows run alone (the base's final pass, recording each
    batch-norm input) and the JVP runs over the clean rows only, each batch
    norm normalising them with the recorded mixed rows' statistics
    (`adapters.clean_rows_only`): the same outputs, JVP and parameter
    gradient, without the tangents of the mixed rows.
    """
    base = self.base
    draw = prepared.draw
    batch = checks.batch_size("inputs", inputs)
    layout = adapters.RowLayout.of(batch, checks.batch_size("clean inputs", clean), groups)
    spec = base.mix_spec(draw) if base.mixes else None
    with adapters.recording_batch_norm(batch) as recorded:
      out_m, state = apply(variables, inputs, key=prepared.key, mix=spec)
    clean_key = jax.random.fold_in(prepared.key, CLEAN_DROPOUT_SALT)

    def run(xc):
      with adapters.clean_rows_only(layout, recorded, clean_key):
        return apply(variables, xc, key=prepared.key)

    out_c, out_dot, _ = jax.jvp(run, (clean,), (tangent,), has_aux=True)
    return base.per_example(out_m, draw), out_c, out_dot, state


def mixupe(objective: objectives.Objective, *, eta: float = 1e-3, exact: bool = False,
           mean: Union[None, str, PyTree] = None, clean_pass: str = "concat",
           batch_stats: str = "mixed", rho: float = 1.0, groups: Optional[int] = None,
           weight: Optional[float] = None, alpha: Optional[float] = None,
           beta: Optional[float] = None, variant: str = "paper",
           threshold: float = RELEASED_THRESHOLD) -> MixupE:
  """MixupE around an objective (see `MixupE`).

  The weight of R is the base policy's first-order weight
  (`policy.first_order_weight()`: E_{D_lam}[1 - lam] for mixup, b / (a + b)
  for Untied MixUp and DAT; the MixupE paper's `E_{D_lam}[1 - lam]` is the
  mixup case). For a base without a policy (ERM: the paper's Table 7) pass
  `alpha` (and `beta`): the weight is then E_{D_lam}[1 - lam] of mixup with
  Beta(alpha, beta). `weight` sets it directly (e.g. for `policies.weighted`
  with a custom gamma). `alpha`/`beta` given with a Beta policy must be the
  policy's. `variant` is 'paper' (default) or 'released' (the authors' code,
  version 3, with `threshold`; see the module docstring).
  """
  policy = getattr(objective, "policy", None)
  params = _beta_params(policy)
  if alpha is not None and params is not None and (
      float(alpha), float(alpha if beta is None else beta)) != params:
    raise ValueError(f"mixupe(alpha={alpha}, beta={beta}) disagrees with the base policy's "
                     f"Beta{params}; leave alpha and beta unset to use the policy's.")
  if weight is None:
    if policy is not None and hasattr(policy, "first_order_weight"):
      weight = policy.first_order_weight()
    elif alpha is not None:
      weight = sampling.expected_one_minus_lam(alpha, beta)
    else:
      raise ValueError("mixupe needs the first-order weight E[1 - lam] of its term: the base "
                       "has no policy with first_order_weight() (e.g. ERM or a custom policy), "
                       "so pass alpha (and beta) of a Beta(alpha, beta) mixup, or weight=.")
  return MixupE(objective, float(weight), eta, exact, mean, clean_pass, batch_stats, rho, groups,
                variant, threshold)


def _beta_params(policy: Any) -> Optional[tuple[float, float]]:
  """(alpha, beta) of a Beta-based policy (`policy.alpha`, `policy.beta`), or None."""
  try:
    alpha, beta = getattr(policy, "alpha", None), getattr(policy, "beta", None)
  except AttributeError:  # `Weighted` around a policy without a Beta.
    return None
  return None if alpha is None or beta is None else (float(alpha), float(beta))
