"""Mixing of pytrees, label targets and whole batches.

`lam` is a scalar f32[] or per-example f32[B]; it broadcasts over every
non-batch axis of every leaf. Arithmetic is in float32 (float64 for float64
inputs) and the result keeps the dtype of the inputs (bf16 stays bf16), so the op reads each input once and
writes once: bandwidth-bound, and fused by XLA with the partner gather.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixjax import checks
from mixjax import pairing as pairing_lib
from mixjax import policies
from mixjax import sampling

PyTree = Any
# A mesh axis, or a tuple of axes the batch is split over jointly (e.g. ('data', 'fsdp')).
AxisName = Union[str, tuple[str, ...]]


def _check_lam(lam: Any, batch: int) -> jax.Array:
  lam = jnp.asarray(lam)
  lam = lam.astype(jnp.promote_types(lam.dtype, jnp.float32))  # f32, or f64 under x64.
  if lam.ndim >= 1 and lam.shape[0] != batch:
    raise ValueError(
        f"lam must be a scalar, a per-example vector f32[{batch}] or a per-example mask "
        f"f32[{batch}, ...] (CutMix), got shape {lam.shape}.")
  checks.in_unit_interval("lam", lam)
  return lam


def _mix_leaf(a: jax.Array, b: jax.Array, lam: jax.Array) -> jax.Array:
  if lam.ndim > 1:  # A per-example mask (CutMix) must broadcast to the leaf.
    try:
      if lam.ndim > a.ndim:
        raise ValueError
      jnp.broadcast_shapes(lam.shape + (1,) * (a.ndim - lam.ndim), a.shape)
    except ValueError:
      raise ValueError(f"lam of shape {lam.shape} (a per-example mask such as CutMix's) does "
                       f"not broadcast to an input leaf of shape {a.shape}; a mask f32[B, H, W, "
                       "1] mixes images f[B, H, W, C] only (mix at the input, not a hidden "
                       "point).") from None
  lam = lam.reshape(lam.shape + (1,) * (a.ndim - lam.ndim))
  compute = jnp.promote_types(a.dtype, jnp.float32)  # bf16 -> f32; f64 stays f64.
  lam = lam.astype(compute)
  af, bf = a.astype(compute), b.astype(compute)
  return (lam * af + (1.0 - lam) * bf).astype(a.dtype)


def mix(a: PyTree, b: PyTree, lam: Any) -> PyTree:
  """`lam * a + (1 - lam) * b` leaf by leaf.

  Args:
    a, b: pytrees of the same structure, float leaves with a common leading
      batch axis B (images f[B, H, W, C], embeddings f[B, T, D], dicts ...).
    lam: f32[] or f32[B], in [0, 1]; or a per-example mask f32[B, ...] that
      broadcasts to every leaf (CutMix: f32[B, H, W, 1] for images f[B, H, W, C]).
  Returns:
    A pytree like `a` (same shapes and dtypes).
  """
  checks.float_leaves("inputs", a)
  batch = checks.batch_size("inputs", a)
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    raise ValueError("a and b must be pytrees of the same structure.")
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    if jnp.shape(u) != jnp.shape(v):
      raise ValueError(f"mix: a{jax.tree_util.keystr(path)} has shape {jnp.shape(u)} but "
                       f"b{jax.tree_util.keystr(path)} has {jnp.shape(v)}; they must match "
                       "(no broadcasting of a batch against another).")
  lam = _check_lam(lam, batch)
  return jax.tree_util.tree_map(lambda u, v: _mix_leaf(u, v, lam), a, b)


def take(tree: PyTree, perm: jax.Array, *, mesh: Optional[Mesh] = None,
         axis_name: AxisName = "data") -> PyTree:
  """Gathers `tree[perm]` along the batch axis of every leaf.

  With `mesh`, `perm` must be shard-local (see `pair`) and the gather runs per shard.
  """
  gather = lambda t, p: jax.tree_util.tree_map(  # noqa: E731
      lambda x: jnp.take(x, p, axis=0, mode="clip"), t)
  if mesh is None:
    return gather(tree, perm)
  local = perm.shape[0] // _num_shards(mesh, axis_name, perm.shape[0])

  def body(t, p):
    return gather(t, p - jax.lax.axis_index(axis_name) * local)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                       out_specs=P(axis_name))(tree, perm)


def mix_with_partner(tree: PyTree, perm: jax.Array, lam: Any, *, mesh: Optional[Mesh] = None,
                     axis_name: AxisName = "data") -> PyTree:
  """`lam * tree + (1 - lam) * tree[perm]` (see `mix`).

  With `mesh`, the batch axis is sharded over `mesh` axis `axis_name` and
  `perm` must pair examples only inside each shard (`pairing.grouped` with one
  group per shard); the op then runs in `shard_map` and moves no data between
  devices.
  """
  checks.float_leaves("inputs", tree)
  batch = checks.batch_size("inputs", tree)
  perm = jnp.asarray(perm)
  if perm.shape != (batch,) or not jnp.issubdtype(perm.dtype, jnp.integer):
    raise ValueError(f"perm must be int[{batch}] (one partner per example), got "
                     f"{perm.dtype}{list(perm.shape)}.")
  checks.check_array(perm, lambda p: (p >= 0) & (p < batch),
                     f"perm must hold partner indices in [0, {batch}).")
  lam = _check_lam(lam, batch)
  if mesh is None:
    return mix(tree, take(tree, perm), lam)
  _num_shards(mesh, axis_name, batch)
  spec = P(axis_name)

  def body(t, p, l):  # Local shard: p holds global indices into this shard.
    return mix(t, take(t, p - jax.lax.axis_index(axis_name) * p.shape[0]), l)

  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec if lam.ndim else P()),
                       out_specs=spec)(tree, perm, lam)


def to_targets(labels: jax.Array, num_classes: Optional[int] = None,
               label_smoothing: float = 0.0) -> jax.Array:
  """Class ids int[B] or targets f[B, C] -> f32[B, C] targets, optionally smoothed.

  Label smoothing: `t * (1 - s) + s / C`.
  """
  labels = jnp.asarray(labels) if not checks.is_traced(labels) else labels
  if not 0.0 <= float(label_smoothing) < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
  if jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_:
    if labels.ndim != 1:
      raise ValueError(f"integer labels must be class ids int[B], got shape {labels.shape}.")
    if num_classes is None:
      raise ValueError("num_classes is required when labels are integer class ids.")
    checks.check_array(labels, lambda l: (l >= 0) & (l < num_classes),
                       f"labels must be class ids in [0, num_classes={num_classes}); a label "
                       "outside would give an all-zero target row. Check num_classes.")
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    if labels.ndim != 2:
      raise ValueError(f"float labels must be targets f[B, C], got shape {labels.shape}.")
    if num_classes is not None and labels.shape[1] != num_classes:
      raise ValueError(f"labels have {labels.shape[1]} classes but num_classes={num_classes}.")
    targets = labels.astype(jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]
  return targets


def class_ids(labels: jax.Array) -> jax.Array:
  """int32[B] class ids from class ids or (soft) targets f[B, C] (argmax)."""
  labels = jnp.asarray(labels) if not checks.is_traced(labels) else labels
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return labels.astype(jnp.int32)
  return jnp.argmax(labels, axis=-1).astype(jnp.int32)


class Draw(NamedTuple):
  """The random part of a mixing step, drawn once and shared by every pass.

  coeffs: `policies.Coefficients(lam_x, lam_y)`, each f32[B] or f32[] (None
    for ERM). perm: int32[B] partner indices (None for ERM).
  targets_a / targets_b: f32[B, C] targets of each example and of its partner
    (targets_b None for ERM).
  """
  coeffs: Optional[policies.Coefficients]
  perm: Optional[jax.Array]
  targets_a: jax.Array
  targets_b: Optional[jax.Array]


class MixedBatch(NamedTuple):
  """A mixed batch.

  inputs: like the input pytree. targets: f32[B, C], `lam_y*t_i + (1-lam_y)*t_perm[i]`.
  targets_a / targets_b: f32[B, C] targets of the example and of its partner.
  coeffs: the `policies.Coefficients` used. perm: int32[B] partner indices.
  """
  inputs: PyTree
  targets: jax.Array
  targets_a: jax.Array
  targets_b: jax.Array
  coeffs: policies.Coefficients
  perm: jax.Array


def check_batch(inputs: PyTree, labels: jax.Array, float_inputs: bool = True) -> int:
  """The batch size B of `inputs` and `labels`; ValueError if they differ (or inputs are not float)."""
  if float_inputs:
    checks.float_leaves("inputs", inputs)
  batch = checks.batch_size("inputs", inputs)
  label_batch = checks.batch_size("labels", labels)
  if label_batch != batch:
    raise ValueError(f"labels have batch size {label_batch} but inputs have {batch}; they must "
                     "match.")
  return batch


# Where one coefficient draw is shared (`draw`'s `scope`); a per-batch draw is the
# policy's own (`per_example=False`).
SCOPES = ("example", "pair", "device", "host")


def check_scope(scope: str, policy: policies.Policy,
                pairing: Optional[pairing_lib.Pairing] = None) -> None:
  """ValueError unless `scope` is one of `SCOPES` and fits `policy` and `pairing` (if given)."""
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {list(SCOPES)} (a per-batch coefficient is the "
                     f"policy's per_example=False), got {scope!r}.")
  if scope != "example" and not getattr(policy, "per_example", True):
    raise ValueError(f"scope={scope!r} shares one of the policy's per-example draws within each "
                     f"{scope} block, but the policy draws one coefficient per batch "
                     "(per_example=False): build it with per_example=True.")
  if scope == "pair" and pairing is not None and pairing is not pairing_lib.reverse:
    raise ValueError(f"scope='pair' gives examples i and B-1-i one coefficient (timm's "
                     f"mode='pair'), so it needs pairing.reverse (the flipped batch), got "
                     f"{getattr(pairing, '__name__', pairing)!r}.")


def shard_groups(scope: str, mesh: Optional[Mesh], axis_name: AxisName = "data") -> np.ndarray:
  """int[D]: the block (0 .. G-1) of each of the D batch shards, for scope 'device' or 'host'.

  'device': shard `s` is its own block. 'host': the block of shard `s` is the
  rank of the process that holds it (among the processes holding the batch).
  Without a mesh the batch is one shard on one device of one process ([0]).
  Static (NumPy): read from the mesh's devices, never from traced values.
  """
  if mesh is None:
    return np.zeros((1,), np.int64)
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  num_shards(mesh, axis_name)  # Raises for an unknown axis.
  order = [mesh.axis_names.index(n) for n in names]
  rest = [i for i in range(mesh.devices.ndim) if i not in order]
  devices = np.transpose(mesh.devices, order + rest)
  devices = devices[(Ellipsis,) + (0,) * len(rest)].reshape(-1)  # Batch shard order.
  if scope == "device":
    return np.arange(devices.size)
  return np.unique([d.process_index for d in devices], return_inverse=True)[1].reshape(-1)


def share(key: jax.Array, policy: policies.Policy, batch: int, scope: str, perm: jax.Array, *,
          mesh: Optional[Mesh] = None, axis_name: AxisName = "data") -> policies.Coefficients:
  """The coefficients of B examples, one draw of `policy` shared within each block of `scope`.

  scope 'example': the policy's draw as it is (f32[B] per example, f32[] for
  a per-batch policy; CutMix masks f32[B, H, W, 1]). 'pair': example `i`
  takes draw `min(i, perm[i])`, so `i` and its partner share it (with
  reverse pairing, `i` and `B-1-i`: timm's mode='pair'). 'device' / 'host':
  the policy draws G coefficients (one per device shard of the batch, or per
  process: `shard_groups`) and each example takes its block's. The G (or B)
  numbers are drawn replicated from `key`, which every process derives from
  the same (seed, step): all processes agree on them without communicating,
  and each device then keeps the rows of its shard, so the draw adds no
  collective. Every value keeps the policy's distribution (KS-tested).
  perm: int32[B] partners (used by 'pair'). Returns f32[B] leaves (masks
  f32[B, ...]) laid out along the batch axis with a mesh; f32[] stays
  replicated.
  """
  check_scope(scope, policy)
  if scope == "example":
    coeffs = policy(key, batch)
    rows = None
  elif scope == "pair":
    coeffs = policy(key, batch)
    rows = jnp.minimum(jnp.arange(batch, dtype=jnp.int32), perm)
  else:
    groups = shard_groups(scope, mesh, axis_name)
    if batch % groups.size:
      raise ValueError(f"batch size {batch} is not divisible by the {groups.size} shards of "
                       f"{axis_name!r}.")
    coeffs = policy(key, int(groups.max()) + 1)
    rows = jnp.asarray(np.repeat(groups, batch // groups.size), jnp.int32)
  if mesh is not None:
    coeffs = _replicated(coeffs, mesh)
  if rows is not None:
    coeffs = jax.tree_util.tree_map(lambda c: jnp.take(c, rows, axis=0), coeffs)
  if mesh is not None:
    coeffs = jax.tree_util.tree_map(lambda c: _batch_sharded(c, mesh, axis_name), coeffs)
  return coeffs


def draw(key: jax.Array, labels: jax.Array, batch: int, *, policy: policies.Policy,
         pairing: pairing_lib.Pairing = pairing_lib.random_permutation,
         num_classes: Optional[int] = None, label_smoothing: float = 0.0,
         mesh: Optional[Mesh] = None, axis_name: AxisName = "data",
         scope: str = "example") -> Draw:
  """Coefficients, partners and targets for a batch of B examples (the one draw of every method).

  `key` splits into the coefficients' key and the pairing's key. Coefficients
  are drawn replicated (every device draws the same numbers, so the Beta
  sampler's rejection loop never synchronises devices); with a mesh,
  per-example ones are then laid out along the batch axis like the examples
  (a local slice), so everything per example stays on its device.
  scope: where one draw is shared, 'example' (default), 'pair', 'device' or
  'host' (see `share`; a per-batch draw is the policy's `per_example=False`).
  """
  checks.prng_key("key", key)
  policies.check_policy("policy", policy)
  check_scope(scope, policy, pairing)
  targets = to_targets(labels, num_classes, label_smoothing)
  k_lam, k_pair = jax.random.split(key)
  perm = pair(k_pair, class_ids(labels), pairing, mesh=mesh, axis_name=axis_name)
  coeffs = share(k_lam, policy, batch, scope, perm, mesh=mesh, axis_name=axis_name)
  targets_b = take(targets, perm, mesh=mesh, axis_name=axis_name)
  return Draw(coeffs, perm, targets, targets_b)


def mix_batch(key: jax.Array, inputs: PyTree, labels: jax.Array, *,
              policy: policies.Policy,
              pairing: pairing_lib.Pairing = pairing_lib.random_permutation,
              num_classes: Optional[int] = None, label_smoothing: float = 0.0,
              mesh: Optional[Mesh] = None, axis_name: AxisName = "data",
              scope: str = "example") -> MixedBatch:
  """Draws coefficients and partners and mixes a batch.

  Args:
    key: PRNG key.
    inputs: pytree of float arrays with leading batch axis B.
    labels: int[B] class ids or f[B, C] (one-hot or soft) targets.
    policy: e.g. `policies.mixup(1.0)`.
    pairing: e.g. `pairing.random_permutation`.
    num_classes: C, needed for integer labels.
    label_smoothing: applied to the targets before mixing.
    mesh, axis_name: with a mesh, the batch is taken as sharded over mesh axis
      `axis_name` (or jointly over a tuple of axes); pairing and mixing run inside each shard (`shard_map`), shard
      `g` pairing with key `fold_in(key_pair, g)`: equal to the single-device
      result with `pairing.grouped(pairing, num_shards)`, and no example moves
      between devices.
    scope: where one coefficient is shared: 'example', 'pair', 'device' or
      'host' (`share`); one per batch is the policy's `per_example=False`.
  Returns:
    A `MixedBatch`. The draw is `draw(key, labels, B, ...)`, the one every
    mixing objective makes.
  """
  batch = check_batch(inputs, labels)
  d = draw(key, labels, batch, policy=policy, pairing=pairing, num_classes=num_classes,
           label_smoothing=label_smoothing, mesh=mesh, axis_name=axis_name, scope=scope)
  mixed = mix_with_partner(inputs, d.perm, d.coeffs.lam_x, mesh=mesh, axis_name=axis_name)
  mixed_targets = mix(d.targets_a, d.targets_b, d.coeffs.lam_y)
  return MixedBatch(mixed, mixed_targets, d.targets_a, d.targets_b, d.coeffs, d.perm)


def _replicated(tree, mesh):
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


def _batch_sharded(x: jax.Array, mesh: Mesh, axis_name: AxisName) -> jax.Array:
  """A per-example f[B] laid out along the batch axis (scalars stay replicated)."""
  if jnp.ndim(x) == 0:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axis_name)))


def num_shards(mesh: Mesh, axis_name: AxisName) -> int:
  """Devices along mesh axis `axis_name` (the product over a tuple of axes)."""
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  missing = [n for n in names if n not in mesh.shape]
  if missing or not names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis (or tuple of axes) of the mesh "
                     f"{dict(mesh.shape)}.")
  return int(np.prod([mesh.shape[n] for n in names]))


def _num_shards(mesh: Mesh, axis_name: AxisName, batch: int) -> int:
  shards = num_shards(mesh, axis_name)
  if batch % shards:
    raise ValueError(f"batch size {batch} is not divisible by the {shards} shards of {axis_name!r}.")
  return shards


def pair(key: jax.Array, labels: jax.Array, pairing: pairing_lib.Pairing, *,
         mesh: Optional[Mesh] = None, axis_name: AxisName = "data") -> jax.Array:
  """Partner indices int32[B] for class ids `labels` int32[B].

  With `mesh`, the pairing runs inside each shard of `axis_name` (shard `g` with
  key `fold_in(key, g)`), the same as `pairing.grouped(pairing, num_shards)`
  on one device, and the labels never leave their device.

  Any batch size works, odd ones and 1 included (every pairing returns a
  partner in [0, B)). A shard that holds a single example can only pair it
  with itself, so shard-local mixing with a per-shard batch of 1 is the
  identity (inputs and targets unchanged, no error): use a per-shard batch
  of at least 2, or `shard_local=False`, to mix.
  """
  batch = labels.shape[0]
  if mesh is None:
    return pairing(key, labels, batch)
  local = batch // _num_shards(mesh, axis_name, batch)

  def body(ids):
    shard = jax.lax.axis_index(axis_name)
    return pairing(jax.random.fold_in(key, shard), ids, local) + shard * local

  return jax.shard_map(body, mesh=mesh, in_specs=P(axis_name), out_specs=P(axis_name))(labels)


def draw_dirichlet(key: jax.Array, batch: int, *, alpha: float, k: int,
                   largest_first: bool = False) -> tuple[jax.Array, jax.Array]:
  """Weights and partners of k-way mixing: (w f32[B, k], perms int32[k, B]).

  `w[i] ~ Dirichlet(alpha * 1_k)` per example; `perms[0]` is the identity and
  `perms[1:]` are independent uniformly random permutations (any B >= 1).
  largest_first: sort each row of `w` in decreasing order, so the example
  itself always has the largest weight (big_vision's option: the mix stays
  closest to its own image and label).
  """
  if int(k) != k or k < 2:
    raise ValueError(f"k (the number of examples mixed) must be an integer >= 2, got {k!r}.")
  k_w, k_p = jax.random.split(key)
  w = sampling.sample_dirichlet(k_w, alpha, int(k), (int(batch),))
  if largest_first:
    w = -jnp.sort(-w, axis=-1)
  perms = jnp.concatenate([
      jnp.arange(batch, dtype=jnp.int32)[None],
      jax.vmap(lambda kk: jax.random.permutation(kk, batch).astype(jnp.int32))(
          jax.random.split(k_p, int(k) - 1)),
  ])
  return w, perms


def combine(tree: PyTree, w: jax.Array, perms: jax.Array) -> PyTree:
  """`sum_m w[:, m] * leaf[perms[m]]` for every leaf (f32 arithmetic, leaf dtype kept).

  tree: float leaves with batch axis B; w: f32[B, k]; perms: int32[k, B].
  """
  batch, k = w.shape

  def leaf(x):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    out = sum(w[:, m].reshape((batch,) + (1,) * (x.ndim - 1)).astype(xf.dtype) * xf[perms[m]]
              for m in range(k))
    return out.astype(x.dtype)
  return jax.tree_util.tree_map(leaf, tree)


def mix_dirichlet(key: jax.Array, inputs: PyTree, labels: jax.Array, *, alpha: float, k: int,
                  num_classes: Optional[int] = None, label_smoothing: float = 0.0,
                  largest_first: bool = False) -> tuple[PyTree, jax.Array]:
  """k-way mixing with per-example weights `w ~ Dirichlet(alpha * 1_k)`.

  Example `i` is mixed with `k - 1` partners from independent random
  permutations: `sum_m w[i, m] * x[perm_m[i]]` (`perm_0` = identity); the
  draw is `draw_dirichlet(key, B, alpha=alpha, k=k, largest_first=...)`.
  Returns (mixed inputs like `inputs`, mixed targets f32[B, C], smoothed
  before mixing).
  """
  checks.float_leaves("inputs", inputs)
  batch = checks.batch_size("inputs", inputs)
  if checks.batch_size("labels", labels) != batch:
    raise ValueError("labels and inputs must have the same batch size.")
  targets = to_targets(labels, num_classes, label_smoothing)
  w, perms = draw_dirichlet(key, batch, alpha=alpha, k=k, largest_first=largest_first)
  return combine(inputs, w, perms), combine(targets, w, perms)
