"""Model adapters: a model (linen, NNX, a plain function, or split at a point) -> an `ApplyFn`.

Objectives run a model only through an `ApplyFn`:

  apply(variables, inputs, *, key=None, mix=None) -> (outputs, new_model_state)

`variables` is `{'params': ..., **model_state}`, `key` seeds dropout, and
`mix` is a `MixSpec` (mix the inputs, or the output of a named submodule) or
None. The new model state holds the updated mutable collections ({} when
there are none or `train=False`).

Adapters here:
- `make_apply(module)`: a linen module called as `module(x, train=...)` (a
  `LinenApply`, which also runs the model split at any hidden point);
- `make_apply_fn(fn)`: a plain `fn(params, x) -> outputs` (input mixing only);
- `make_nnx_apply(model)`: a `flax.nnx` model, returning `(apply, variables)`
  (an `NnxApply`, which also runs the model split at any hidden point);
- `SplitApply` / `make_split_apply` / `split_apply_fn`: a model split into
  `encode` and `head` at a named point, so that passes which re-mix at that
  point (AMP's lambda passes) re-run the head only;
- `mixed_rows_only(...)`: routes the batch-norm and dropout layers of a pass
  over [mixed rows; clean rows] (MixupE's concatenated pass), for linen models
  and NNX models run by `make_nnx_apply`; `recording_batch_norm` and
  `clean_rows_only` run the same pass as two, one per block of rows.

No adapter keeps module-level state: NNX call hooks live in a `ContextVar`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixjax import hidden
from mixjax import mixing

PyTree = Any


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

  def mix(self, tree: PyTree) -> PyTree:
    """`lam * tree + (1 - lam) * tree[perm]` on this spec's mesh."""
    return mixing.mix_with_partner(tree, self.perm, self.lam, mesh=self.mesh,
                                   axis_name=self.axis_name)


ApplyFn = Callable[..., tuple[Any, PyTree]]
Within = Callable[[], contextlib.AbstractContextManager]  # Entered around a head pass.


def _linen_call(module: nn.Module, variables: PyTree, x: Any, key: Optional[jax.Array],
                train: bool, mutable: tuple[str, ...], train_arg: Optional[str],
                method: Any = None) -> tuple[Any, PyTree]:
  """`module.apply` with dropout `key`, the train flag and the mutable collections present."""
  rngs = {"dropout": key} if key is not None else {}
  kwargs = {train_arg: train} if train_arg else {}
  if method is not None:
    kwargs["method"] = method
  cols = [c for c in mutable if c in variables] if train else []
  if cols:
    out, state = module.apply(variables, x, rngs=rngs, mutable=cols, **kwargs)
    return out, dict(state)
  return module.apply(variables, x, rngs=rngs, **kwargs), {}


@dataclasses.dataclass(frozen=True, eq=False)
class LinenApply:
  """The `ApplyFn` of a linen module called as `module(x, train=train)` (`make_apply`).

  Also runs the model split at any hidden mixing point, the module unchanged
  (`run_encoder` / `run_head`, through `hidden.capture_below` /
  `hidden.inject_at`), so that passes which re-mix at that point (AMP's
  lambda passes) run only the layers above it, as with a `SplitApply`.
  """
  module: nn.Module
  train: bool = True
  mutable: tuple[str, ...] = ("batch_stats",)
  train_arg: Optional[str] = "train"
  output_dtype: Optional[Any] = None

  def __call__(self, variables: PyTree, inputs: PyTree, *, key: Optional[jax.Array] = None,
               mix: Optional[MixSpec] = None) -> tuple[Any, PyTree]:
    if mix is not None and mix.point is None:
      inputs = mix.mix(inputs)
    ctx = (hidden.mix_at(mix.point, mix.lam, mix.perm, mesh=mix.mesh, axis_name=mix.axis_name)
           if mix is not None and mix.point is not None else contextlib.nullcontext())
    with ctx:
      return self._call(variables, inputs, key)

  def _call(self, variables, inputs, key):
    out, state = _linen_call(self.module, variables, inputs, key, self.train, self.mutable,
                             self.train_arg)
    if self.output_dtype is not None:
      out = jax.tree_util.tree_map(lambda o: o.astype(self.output_dtype), out)
    return out, state

  def encodes_at(self, point: Optional[str]) -> bool:
    """Whether `run_encoder` can stop at `point` (any submodule path)."""
    return point is not None

  def run_encoder(self, variables: PyTree, inputs: PyTree, key: Optional[jax.Array],
                  point: Optional[str] = None) -> Optional[Encoded]:
    """The layers below the submodule at `point`: `Encoded`, or None if it is called more than once.

    One pass of the whole model (XLA drops the layers above `point`, whose
    results are unused). `h` is the submodule's output, `state` the mutable
    collections with the updates of the layers below `point` only.
    """
    with hidden.capture_below(point) as cap:
      self._call(variables, inputs, key)
    if cap.calls == 0:
      raise ValueError(f"No submodule at path {point!r} was called; mixing points of this "
                       f"model: {hidden.module_paths(self.module, variables, inputs)}.")
    if cap.calls > 1:  # The later calls see the mixed first one: no split there.
      return None
    cols = [c for c in self.mutable if c in variables] if self.train else []
    state = {c: variables[c] for c in cols}
    for path, module_vars in cap.variables:
      for c in cols:
        if c in module_vars:
          state[c] = _set_at(state[c], path, module_vars[c])
    return Encoded(cap.h, {**variables, **state}, state, tuple(cap.below), inputs)

  def run_head(self, encoded: Encoded, key: Optional[jax.Array],
               mix: Optional[MixSpec] = None, within: Within = contextlib.nullcontext
               ) -> tuple[Any, PyTree]:
    """The layers above `mix.point` on `encoded.h` mixed by `mix`: (outputs, new state of all).

    `within()`: a context entered around the layers above the point only (its
    interceptors see the calls that run, not the replayed ones below).
    """
    if mix is None or mix.point is None:
      raise ValueError("LinenApply.run_head needs the MixSpec of the hidden point the encoder "
                       "stopped at.")
    # Entered after inject_at, so that inject_at's interceptor runs first (flax calls the
    # interceptor entered first outermost).
    with hidden.inject_at(mix.point, mix.mix(encoded.h), encoded.below), within():
      return self._call(encoded.head_variables, encoded.inputs, key)


def _set_at(tree: PyTree, path: tuple[str, ...], value: PyTree) -> PyTree:
  """A copy of the nested dict `tree` with `value` at `path`."""
  if not path:
    return value
  tree = dict(tree)
  tree[path[0]] = _set_at(tree.get(path[0], {}), path[1:], value)
  return tree


def make_apply(module: nn.Module, train: bool = True, mutable: tuple[str, ...] = ("batch_stats",),
               train_arg: Optional[str] = "train", output_dtype: Optional[Any] = None
               ) -> LinenApply:
  """An `ApplyFn` for a linen module called as `module(x, train=train)`.

  Collections in `mutable` that are present in `variables` are updated when
  `train` and returned as the new model state ({} otherwise). `key` seeds the
  'dropout' stream. `train_arg=None` for modules without a train flag. Hidden
  mixing points are submodule paths (`hidden.mix_at`); the returned
  `LinenApply` also runs the model split at them (AMP's lambda passes then
  re-run only the layers above the point). `output_dtype` (e.g. `jnp.float32`
  for a bf16 model, so that losses and metrics are computed in f32) casts
  every output leaf.
  """
  return LinenApply(module, train, tuple(mutable), train_arg, output_dtype)


def make_apply_fn(fn: Callable[[PyTree, PyTree], jax.Array]) -> ApplyFn:
  """An `ApplyFn` for a plain `fn(params, x) -> outputs` (variables = {'params': params})."""
  def apply(variables, inputs, *, key=None, mix: Optional[MixSpec] = None):
    del key
    if mix is not None:
      if mix.point is not None:
        raise ValueError("a plain apply function has no submodules: use point=None (input "
                         "mixing), or split the model with `split_apply_fn`.")
      inputs = mix.mix(inputs)
    return fn(variables["params"], inputs), {}
  return apply


# ----------------------------------------------------------------------------
# NNX.

_NNX_HOOKS: contextvars.ContextVar[tuple[Callable[[Any], Any], ...]] = contextvars.ContextVar(
    "mixjax_nnx_hooks", default=())


@contextlib.contextmanager
def nnx_call_hook(hook: Callable[[Any], Any]) -> Iterator[None]:
  """While active, `make_nnx_apply`'s apply runs the model inside `hook(model)`.

  `hook` takes the merged `nnx.Module` and returns a context manager: the NNX
  counterpart of `flax.linen.intercept_methods`. Like linen's interceptors it
  acts while the apply function is traced. The hooks of a context are its own
  (a `ContextVar`), so threads and nested uses do not see each other's.
  """
  token = _NNX_HOOKS.set(_NNX_HOOKS.get() + (hook,))
  try:
    yield
  finally:
    _NNX_HOOKS.reset(token)


@dataclasses.dataclass(frozen=True, eq=False)
class NnxApply:
  """The `ApplyFn` of a `flax.nnx` model (`make_nnx_apply`).

  Also runs the model split at any hidden mixing point, the model unchanged
  (`run_encoder` / `run_head`, through `hidden.nnx_capture_below` /
  `hidden.nnx_inject_at`), so that passes which re-mix at that point (AMP's
  lambda passes) run only the layers above it, as `LinenApply` does.
  graphdef / rng_keys: `nnx.split(model, nnx.Param, nnx.RngKey, ...)`'s
  graph definition and RNG keys.
  """
  graphdef: Any
  rng_keys: PyTree
  train: bool = True

  def _model(self, params: PyTree, nnx_state: PyTree, key: Optional[jax.Array]) -> Any:
    """A fresh merged model: RNG keys folded from `key`, in train or eval mode."""
    from flax import nnx
    keys = _fresh(self.rng_keys)
    if key is not None:
      leaves, treedef = jax.tree_util.tree_flatten(keys)
      keys = jax.tree_util.tree_unflatten(
          treedef, [jax.random.fold_in(key, i) for i in range(len(leaves))])
    m = nnx.merge(self.graphdef, _fresh(params), keys, _fresh(nnx_state))
    m.train() if self.train else m.eval()
    return m

  @staticmethod
  def _run(m: Any, inputs: PyTree, inner: Callable[[], Any]) -> tuple[Any, PyTree]:
    """`m(inputs)` inside the `nnx_call_hook` hooks and then `inner()`: (outputs, new state)."""
    from flax import nnx
    with contextlib.ExitStack() as stack:
      for hook in _NNX_HOOKS.get():
        stack.enter_context(hook(m))
      stack.enter_context(inner())
      out = m(inputs)
    _, _, _, new_rest = nnx.split(m, nnx.Param, nnx.RngKey, ...)
    return out, {"nnx_state": new_rest}

  def __call__(self, variables: PyTree, inputs: PyTree, *, key: Optional[jax.Array] = None,
               mix: Optional[MixSpec] = None) -> tuple[Any, PyTree]:
    m = self._model(variables["params"], variables["nnx_state"], key)
    if mix is not None and mix.point is None:
      inputs = mix.mix(inputs)
    ctx = ((lambda: hidden.nnx_mix_at(m, mix.point, mix.lam, mix.perm, mesh=mix.mesh,
                                      axis_name=mix.axis_name))
           if mix is not None and mix.point is not None else contextlib.nullcontext)
    return self._run(m, inputs, ctx)

  def encodes_at(self, point: Optional[str]) -> bool:
    """Whether `run_encoder` can stop at `point` (any submodule path)."""
    return point is not None

  def run_encoder(self, variables: PyTree, inputs: PyTree, key: Optional[jax.Array],
                  point: Optional[str] = None) -> Optional[Encoded]:
    """The layers below the submodule at `point`: `Encoded`, or None if it is called more than once.

    One pass of the whole model (XLA drops the layers above `point`, whose
    results are unused). `h` is the submodule's output, `state`
    `{'nnx_state': ...}` right after its call (the updates of the layers
    below `point` only, and the RNG counters the layers above start from).
    Raises ValueError (listing the attribute paths) if no callable submodule
    is at `point` or it is not called.
    """
    if point is None:
      raise ValueError("NnxApply.run_encoder needs a hidden point (a submodule path).")
    m = self._model(variables["params"], variables["nnx_state"], key)
    graph = hidden.nnx_graph(m)  # Walked before the hooks swap any layer.
    capture = []

    @contextlib.contextmanager
    def inner():
      with hidden.nnx_capture_below(m, point, graph) as cap:
        capture.append(cap)
        yield

    self._run(m, inputs, inner)
    cap = capture[0]
    if cap.calls == 0:
      raise ValueError(f"The NNX submodule at path {point!r} was not called; attribute paths "
                       f"of this model: {graph.paths()}.")
    if cap.calls > 1:  # The later calls see the mixed first one: no split there.
      return None
    state = {"nnx_state": cap.state}
    return Encoded(cap.h, {**variables, **state}, state, tuple(cap.below), inputs)

  def run_head(self, encoded: Encoded, key: Optional[jax.Array],
               mix: Optional[MixSpec] = None, within: Within = contextlib.nullcontext
               ) -> tuple[Any, PyTree]:
    """The layers above `mix.point` on `encoded.h` mixed by `mix`: (outputs, new state of all).

    `within()`: as in `LinenApply.run_head` (its `nnx_call_hook` stand-ins
    sit inside the replaying ones, so they see only the calls that run).
    """
    if mix is None or mix.point is None:
      raise ValueError("NnxApply.run_head needs the MixSpec of the hidden point the encoder "
                       "stopped at.")
    variables = encoded.head_variables
    m = self._model(variables["params"], variables["nnx_state"], key)
    graph = hidden.nnx_graph(m)
    h = mix.mix(encoded.h)
    with within():  # Its hooks swap layers first; nnx_inject_at's stand-ins then wrap them.
      return self._run(m, encoded.inputs,
                       lambda: hidden.nnx_inject_at(m, mix.point, h, encoded.below, graph))


def _fresh(tree: PyTree) -> PyTree:
  """A copy of an `nnx.State` with fresh Variables (a merged model must not share them)."""
  return jax.tree_util.tree_map(lambda a: a, tree)


def make_nnx_apply(model: Any, train: bool = True) -> tuple[NnxApply, PyTree]:
  """An `ApplyFn` and its initial variables for a `flax.nnx` model.

  Returns `(apply, variables)` with `variables = {'params': nnx.State of
  nnx.Param, 'nnx_state': the rest (batch statistics, RNG counters)}`; the new
  model state returned by `apply` is `{'nnx_state': ...}`. The model's RNG keys
  are replaced by keys folded from `key` (so dropout is a pure function of
  it); `train` selects `model.train()` or `model.eval()` behaviour. Hidden
  mixing points are attribute paths such as 'blocks/2' (`hidden.nnx_mix_at`);
  the returned `NnxApply` also runs the model split at them (AMP's lambda
  passes then re-run only the layers above the point).
  """
  from flax import nnx

  graphdef, params, rng_keys, rest = nnx.split(model, nnx.Param, nnx.RngKey, ...)
  return NnxApply(graphdef, rng_keys, train), {"params": params, "nnx_state": rest}


# ----------------------------------------------------------------------------
# Models split at the mixing point.


class Encoded(NamedTuple):
  """The encoder's output: h (f[B, ...] pytree), variables for the head, encoder's new state.

  below, inputs: for a `LinenApply` or `NnxApply` (a model split by
  interception or stand-ins), the outputs of the calls below the point and the
  model's inputs, which its head pass replays (`hidden.inject_at`,
  `hidden.nnx_inject_at`); unused by a `SplitApply`.
  """
  h: PyTree
  head_variables: PyTree
  state: PyTree
  below: tuple = ()
  inputs: PyTree = None


@dataclasses.dataclass(frozen=True)
class SplitApply:
  """An `ApplyFn` made of an encoder and a head, mixing allowed at their junction.

  encode: `encode(variables, inputs, *, key) -> (h, new_model_state)`, h a pytree
    with leading batch axis B.
  head: `head(variables, h, *, key) -> (outputs, new_model_state)`.
  point: the name of the mixing point between them (use it as the mixup
    objective's `point`).

  Called as any `ApplyFn`: `apply(variables, inputs, *, key, mix)` with `mix`
  None, at the input (`mix.point is None`) or at `point`. Both parts get the
  same dropout `key` (linen derives distinct streams per submodule path, so a
  linen model split by methods draws the same masks as when called whole).
  The head sees the variables updated by the encoder's new state; the new
  state is the union of both.
  """
  encode: Callable[..., tuple[PyTree, PyTree]]
  head: Callable[..., tuple[Any, PyTree]]
  point: str = "encoder"

  def encodes_at(self, point: Optional[str]) -> bool:
    """Whether `run_encoder` stops at `point` (this split's point)."""
    return point is not None and point == self.point

  def run_encoder(self, variables: PyTree, inputs: PyTree, key: Optional[jax.Array],
                  point: Optional[str] = None) -> Encoded:
    """The encoder pass: `Encoded(h, variables for the head, encoder's new state)`.

    `point` (optional) must be this split's.
    """
    if point not in (None, self.point):
      raise ValueError(f"This SplitApply's encoder stops at {self.point!r}, not {point!r}.")
    h, state = self.encode(variables, inputs, key=key)
    return Encoded(h, {**variables, **state}, dict(state))

  def run_head(self, encoded: Encoded, key: Optional[jax.Array],
               mix: Optional[MixSpec] = None, within: Within = contextlib.nullcontext
               ) -> tuple[Any, PyTree]:
    """The head on `encoded.h` (mixed by `mix` at this point): (outputs, new state of both).

    `within()`: a context entered around the head.
    """
    h = encoded.h if mix is None else mix.mix(encoded.h)
    with within():
      out, head_state = self.head(encoded.head_variables, h, key=key)
    return out, {**encoded.state, **dict(head_state)}

  def __call__(self, variables: PyTree, inputs: PyTree, *, key: Optional[jax.Array] = None,
               mix: Optional[MixSpec] = None):
    if mix is not None and mix.point not in (None, self.point):
      raise ValueError(f"This SplitApply mixes at its inputs (point=None) or at {self.point!r}; "
                       f"got point={mix.point!r}.")
    if mix is not None and mix.point is None:
      inputs = mix.mix(inputs)
    encoded = self.run_encoder(variables, inputs, key)
    return self.run_head(encoded, key, mix if mix is not None and mix.point == self.point
                         else None)


def make_split_apply(module: nn.Module, encode: str = "encode", head: str = "head",
                     point: str = "encoder", train: bool = True,
                     mutable: tuple[str, ...] = ("batch_stats",),
                     train_arg: Optional[str] = "train") -> SplitApply:
  """A `SplitApply` from a linen module with methods `encode(x, train)` and `head(h, train)`.

  The module's `__call__` should be `head(encode(x))`. `train`, `mutable`,
  `train_arg` as in `make_apply`.
  """
  for name in (encode, head):
    if not callable(getattr(module, name, None)):
      raise ValueError(f"{type(module).__name__} has no method {name!r}; make_split_apply needs "
                       f"encode={encode!r} and head={head!r} methods.")

  def part(method):
    def run(variables, x, *, key=None):
      return _linen_call(module, variables, x, key, train, mutable, train_arg, method=method)
    return run

  return SplitApply(part(encode), part(head), point)


def split_apply_fn(encode: Callable[[PyTree, PyTree], PyTree],
                   head: Callable[[PyTree, PyTree], jax.Array],
                   point: str = "encoder") -> SplitApply:
  """A `SplitApply` from plain `encode(params, x) -> h` and `head(params, h) -> outputs`."""
  return SplitApply(lambda v, x, *, key=None: (encode(v["params"], x), {}),
                    lambda v, h, *, key=None: (head(v["params"], h), {}), point)


# ----------------------------------------------------------------------------
# Row routing for a pass over [mixed rows; clean rows] (MixupE's concatenated pass).


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


class RowLayout(NamedTuple):
  """B mixed rows and K clean rows in `groups` groups: per group n = B/groups mixed, m = K/groups clean."""
  groups: int
  n: int
  m: int

  @classmethod
  def of(cls, batch: int, clean: int, groups: int) -> "RowLayout":
    return cls(groups, batch // groups, clean // groups)

  @property
  def total(self) -> int:
    return self.groups * (self.n + self.m)

  def mixed_rows(self) -> jax.Array:
    """bool[total]: True on the mixed rows."""
    return interleave(jnp.ones(self.groups * self.n, bool), jnp.zeros(self.groups * self.m, bool),
                      self.groups)

  def position(self, idx: jax.Array, rows: int, offset: int) -> jax.Array:
    """Row in the layout of example `idx` of a block with `rows` rows per group."""
    return (idx // rows) * (self.n + self.m) + offset + idx % rows

  def spec(self, spec: MixSpec) -> MixSpec:
    """`spec` over the layout: mixed rows as in `spec`, clean rows paired with themselves, lam 1."""
    perm = self.position(spec.perm, self.n, 0)
    own = self.position(jnp.arange(self.groups * self.m), self.m, self.n)
    lam = jnp.broadcast_to(jnp.asarray(spec.lam, jnp.float32), (self.groups * self.n,))
    return spec._replace(lam=interleave(lam, jnp.ones(self.groups * self.m), self.groups),
                         perm=interleave(perm.astype(jnp.int32), own.astype(jnp.int32),
                                         self.groups))

  def split(self, c: PyTree) -> tuple[PyTree, PyTree]:
    """(mixed rows, clean rows) of a pytree laid out this way."""
    return deinterleave(c, self.groups, self.n)


@contextlib.contextmanager
def mixed_rows_only(layout: RowLayout, batch_stats: str, clean_key: jax.Array) -> Iterator[None]:
  """BatchNorm: statistics of the mixed rows; Dropout: mixed rows as if alone.

  Applies to linen `nn.BatchNorm` / `nn.Dropout` (through `nn.intercept_methods`)
  and to NNX `nnx.BatchNorm` / `nnx.Dropout` of models run by `make_nnx_apply`
  (through `nnx_call_hook`). batch_stats='mixed': every row is normalised with
  the statistics of the mixed rows, which alone update the running statistics;
  'all': statistics over all rows. The clean rows' dropout masks come from
  `clean_key`.
  """
  total = layout.total
  dropout = _clean_dropout(clean_key)

  def rows(kind, next_fun, args, kwargs, rng_kwarg, module):
    del module
    x = args[0] if args else None
    if not _has_rows(x, total):
      return next_fun(*args, **kwargs)
    if kind == "batch_norm" and batch_stats == "mixed":
      mask = layout.mixed_rows().reshape((total,) + (1,) * (x.ndim - 1))
      if kwargs.get("mask") is not None:
        mask = jnp.logical_and(mask, kwargs["mask"])
      return next_fun(*args, **{**kwargs, "mask": mask})
    if kind == "dropout":
      a, b = layout.split(x)
      out_a = next_fun(a, *args[1:], **kwargs)
      out_b = dropout(next_fun, (b,) + tuple(args[1:]), kwargs, rng_kwarg)
      return interleave(out_a, out_b, layout.groups)
    return next_fun(*args, **kwargs)

  with _routed(rows):
    yield


@contextlib.contextmanager
def recording_batch_norm(batch: int) -> Iterator[list[tuple[jax.Array, Any]]]:
  """Records `(input, mask)` of every BatchNorm call on `batch` rows, in call order.

  The layers run unchanged (linen and `make_nnx_apply` NNX models, as
  `mixed_rows_only`). With `clean_rows_only` it splits a pass over
  [mixed; clean] rows with batch_stats='mixed' into a pass over the mixed
  rows and one over the clean rows (MixupE's exact term: the JVP then runs
  over the clean rows only).
  """
  recorded: list[tuple[jax.Array, Any]] = []

  def rows(kind, next_fun, args, kwargs, rng_kwarg, module):
    del rng_kwarg, module
    x = args[0] if args else None
    if kind == "batch_norm" and _has_rows(x, batch):
      recorded.append((x, kwargs.get("mask")))
    return next_fun(*args, **kwargs)

  with _routed(rows):
    yield recorded


@contextlib.contextmanager
def clean_rows_only(layout: RowLayout, recorded: list[tuple[jax.Array, Any]],
                    clean_key: jax.Array) -> Iterator[None]:
  """A pass over the clean rows alone as `mixed_rows_only(layout, 'mixed', clean_key)` runs them.

  The i-th BatchNorm call on the `layout.groups * layout.m` clean rows
  normalises them with the statistics of the i-th recorded mixed-row input
  (`recording_batch_norm`; the pass's running-statistics update is the mixed
  rows' and is meant to be discarded); Dropout draws the clean rows' masks of
  `mixed_rows_only`. So the clean outputs, and their derivatives with respect
  to the parameters, the clean rows and the recorded inputs, are those of the
  clean rows of the concatenated pass. A linen BatchNorm normalises the clean
  rows alone (`_linen_norm_with_stats_of`); an NNX one runs over [recorded;
  clean] rows with a mask, so it also normalises the mixed rows again (the
  convolutions and dense layers between them see the clean rows only). Raises
  ValueError on exit if the number of BatchNorm calls differs from the
  recording's.
  """
  clean = layout.groups * layout.m
  dropout = _clean_dropout(clean_key)
  used, inside = [0], [False]

  def rows(kind, next_fun, args, kwargs, rng_kwarg, module):
    x = args[0] if args else None
    if inside[0] or not _has_rows(x, clean):  # inside: `_linen_norm_with_stats_of`'s own calls.
      return next_fun(*args, **kwargs)
    if kind == "batch_norm":
      if used[0] >= len(recorded):
        raise ValueError(f"the clean pass made more batch-norm calls than the "
                         f"{len(recorded)} recorded in the mixed pass.")
      x_m, mask_m = recorded[used[0]]
      used[0] += 1
      if isinstance(module, nn.BatchNorm):
        call_ra = args[1] if len(args) > 1 else kwargs.get("use_running_average")
        if module.use_running_average if call_ra is None else call_ra:
          return next_fun(*args, **kwargs)  # Running averages: no batch statistics.
        inside[0] = True
        try:
          return _linen_norm_with_stats_of(module, x, x_m, mask_m)
        finally:
          inside[0] = False
      if mask_m is None:
        mask = layout.mixed_rows().reshape((layout.total,) + (1,) * (x.ndim - 1))
      else:
        mask = interleave(jnp.broadcast_to(mask_m, x_m.shape).astype(bool),
                          jnp.zeros(x.shape, bool), layout.groups)
      out = next_fun(interleave(x_m, x, layout.groups), *args[1:], **{**kwargs, "mask": mask})
      return layout.split(out)[1]
    if kind == "dropout":
      return dropout(next_fun, args, kwargs, rng_kwarg)
    return next_fun(*args, **kwargs)

  with _routed(rows):
    yield
  if used[0] != len(recorded):
    raise ValueError(f"the clean pass made {used[0]} batch-norm calls, the mixed pass "
                     f"{len(recorded)}: the model's layers must not depend on the batch size.")


def _linen_norm_with_stats_of(module: nn.BatchNorm, x: jax.Array, x_m: jax.Array,
                              mask_m: Any) -> jax.Array:
  """`module(x)` normalised with the batch statistics of `x_m` (masked by `mask_m`).

  Two standalone applies of copies of the linen BatchNorm on its variables:
  with momentum 0 its running-statistics update is exactly the statistics of
  `x_m`, which the second normalises `x` with. So the rows of `x` cost only
  their own normalisation (a JVP carries no tangents through `x_m`'s rows).
  """
  variables = dict(module.variables)
  stats_of = module.clone(parent=None, momentum=0.0, use_running_average=False)
  _, new = stats_of.apply(variables, x_m, mask=mask_m, mutable=["batch_stats"])
  normalise = module.clone(parent=None, use_running_average=True)
  return normalise.apply({**variables, "batch_stats": new["batch_stats"]}, x)


def _has_rows(x: Any, rows: int) -> bool:
  return hasattr(x, "shape") and bool(x.shape) and x.shape[0] == rows


def _clean_dropout(clean_key: jax.Array) -> Callable[..., Any]:
  """Dropout on clean rows: the n-th call draws with `fold_in(clean_key, n)` (n from 1)."""
  calls = [0]

  def run(next_fun, args, kwargs, rng_kwarg):
    calls[0] += 1
    return next_fun(*args, **{**kwargs, rng_kwarg: jax.random.fold_in(clean_key, calls[0])})
  return run


@contextlib.contextmanager
def _routed(rows: Callable[..., Any]) -> Iterator[None]:
  """Sends linen and NNX BatchNorm/Dropout calls through `rows`.

  `rows(kind, next_fun, args, kwargs, rng_kwarg, module)`: kind 'batch_norm',
  'dropout' or None, the call, the name of the rng keyword ('rng' in linen,
  'rngs' in NNX) and the layer.
  """
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    return rows(_kind(context.module, nn), next_fun, args, kwargs, "rng", context.module)

  with nn.intercept_methods(interceptor), nnx_call_hook(lambda model: _nnx_rows(model, rows)):
    yield


def _kind(module: Any, lib: Any) -> Optional[str]:
  """'batch_norm', 'dropout' (a BatchNorm/Dropout of `lib`: linen or nnx) or None."""
  return ("batch_norm" if isinstance(module, lib.BatchNorm) else
          "dropout" if isinstance(module, lib.Dropout) else None)


def _nnx_rows(model: Any, rows: Callable[..., Any]) -> contextlib.AbstractContextManager:
  """While active, the calls of each NNX BatchNorm/Dropout of `model` go through `rows`."""
  from flax import nnx
  layers = [(path, parent, name) for path, parent, name in hidden.nnx_graph(model).modules
            if _kind(hidden.child(parent, name), nnx)]
  return hidden.nnx_routed(layers, lambda path, inner, args, kwargs:
                           rows(_kind(inner, nnx), inner, args, kwargs, "rngs", inner))
