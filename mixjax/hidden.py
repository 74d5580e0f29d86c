"""Mixing at hidden layers of unmodified Flax models ("manifold mixup").

Linen models: `mix_at` intercepts the output of the submodule at a path with
`flax.linen.intercept_methods`. NNX models: `nnx_mix_at` swaps the submodule for
a wrapper for the duration of the block. Neither needs the model's code changed::

  with mix_at("layer2", lam, perm):
    logits = model.apply(variables, x)

`capture_below` and `inject_at` split a linen pass at a submodule: one pass
records what the layers below it compute, later passes start at it.
`nnx_capture_below` and `nnx_inject_at` do the same for an NNX model: for the
duration of the block every callable submodule (all depths, `nnx_graph`) is
swapped for a stand-in that routes its `__call__` (other attributes are the
module's), and the capture also snapshots the model's non-Param, non-RngKey
state right after the point's call, which the second pass starts from.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mixjax import mixing

Path = Union[str, Sequence[str]]


def normalize_path(path: Path) -> tuple[str, ...]:
  """'stage1/block0' or ('stage1', 'block0') -> ('stage1', 'block0')."""
  if isinstance(path, str):
    parts = tuple(p for p in path.split("/") if p)
  else:
    parts = tuple(str(p) for p in path)
  if not parts:
    raise ValueError("path must name a submodule, e.g. 'layer2' or 'stage1/block0'.")
  return parts


@contextlib.contextmanager
def mix_at(path: Path, lam: Any, perm: jax.Array, *, mesh: Optional[Mesh] = None,
           axis_name: mixing.AxisName = "data") -> Iterator[None]:
  """Within the block, the linen submodule at `path` outputs its mixed output.

  The output `h` (f[B, ...] or a pytree) of every `__call__` of the submodule
  is replaced by `lam * h + (1 - lam) * h[perm]`. Raises `ValueError` on exit
  if no submodule at `path` was called, listing the paths that were.
  """
  target = normalize_path(path)
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    here = tuple(context.module.path)
    if here == target:
      seen.append("hit")
      return mixing.mix_with_partner(out, perm, lam, mesh=mesh, axis_name=axis_name)
    seen.append("/".join(here))
    return out

  with nn.intercept_methods(interceptor):
    yield
  if "hit" not in seen:
    called = sorted({s for s in seen if s})
    raise ValueError(f"No submodule at path {'/'.join(target)!r} was called; "
                     f"mixing points of this model: {called}.")


def _role(here: tuple[str, ...], method: str, target: tuple[str, ...]) -> str:
  """A call's role before the point ran: 'run' (an ancestor's or `setup`), 'point' or 'below'."""
  if method == "setup" or (len(here) < len(target) and target[:len(here)] == here):
    return "run"
  return "point" if here == target and method == "__call__" else "below"


class Capture:
  """What a linen pass computes below the submodule at a path (`capture_below`).

  h: the submodule's output (its one `__call__`), None if it was not reached.
  below: outputs of the calls made before it by modules that are not its
    ancestors (top-level ones: not those nested in another recorded call), in order.
  variables: `(module path, the module's variables right after its call)` for
    those calls and the point's, in order.
  calls: how many times the submodule's `__call__` ran.
  """

  def __init__(self):
    self.h: Any = None
    self.below: list[Any] = []
    self.variables: list[tuple[tuple[str, ...], Any]] = []
    self.calls = 0
    self._depth, self._done = 0, False

  def record(self, role: str, run: Any, after: Any) -> Any:
    """`run()` for a call with `role` (`_role`), recorded if top-level before the point.

    `after(role)` runs right after each recorded call.
    """
    self.calls += role == "point"
    if self._done or self._depth or role == "run":
      return run()
    self._depth += 1
    try:
      out = run()
    finally:
      self._depth -= 1
    if role == "point":
      self.h, self._done = out, True
    else:
      self.below.append(out)
    after(role)
    return out


@contextlib.contextmanager
def capture_below(path: Path) -> Iterator[Capture]:
  """Within the block, records what a linen pass computes below the submodule at `path`.

  The pass runs unchanged. Yields a `Capture`, filled as the pass runs. With
  `inject_at` it lets a second pass start at `path`: the layers below it do
  not run again.
  """
  target = normalize_path(path)
  cap = Capture()

  def interceptor(next_fun, args, kwargs, context):
    here = tuple(context.module.path)
    return cap.record(_role(here, context.method_name, target),
                      lambda: next_fun(*args, **kwargs),
                      lambda _: cap.variables.append((here, context.module.variables)))

  with nn.intercept_methods(interceptor):
    yield cap


@contextlib.contextmanager
def inject_at(path: Path, h: Any, below: Sequence[Any]) -> Iterator[None]:
  """Within the block, a linen pass starts at the submodule at `path`: it outputs `h`.

  The submodule does not run, and the calls before it by modules that are
  not its ancestors return `below` (in order, from `capture_below`) without
  running, so the layers below `path` compute nothing (what the ancestors
  compute between those calls runs; XLA removes it where unused). Raises
  `ValueError` on exit if the pass's calls do not match the capture's.
  """
  target = normalize_path(path)
  replay = _Replay(target, h, below)

  def interceptor(next_fun, args, kwargs, context):
    role = _role(tuple(context.module.path), context.method_name, target)
    return replay(role, lambda: next_fun(*args, **kwargs))

  with nn.intercept_methods(interceptor):
    yield
  replay.check()


class _Replay:
  """The calls of a pass started at a point: `h` at the point, `below` (in order) below it."""

  def __init__(self, target: tuple[str, ...], h: Any, below: Sequence[Any]):
    self.target, self.h, self.below = target, h, below
    self.replayed, self.hit = 0, False

  def __call__(self, role: str, run: Any) -> Any:
    """The result of a call with `role` (`_role`); `run()` runs it."""
    if self.hit or role == "run":
      return run()
    if role == "point":
      self.hit = True
      return self.h
    if self.replayed >= len(self.below):
      raise ValueError(f"the pass made more calls below {'/'.join(self.target)!r} than the "
                       f"{len(self.below)} captured.")
    self.replayed += 1
    return self.below[self.replayed - 1]

  def check(self) -> None:
    """ValueError unless the pass reached the point after replaying every captured call."""
    if not self.hit or self.replayed != len(self.below):
      raise ValueError(f"the pass made {self.replayed} calls below {'/'.join(self.target)!r} "
                       f"(the capture {len(self.below)}) and "
                       f"{'reached' if self.hit else 'did not reach'} it.")


def module_paths(module: nn.Module, variables: Any, *args, **kwargs) -> list[str]:
  """Paths of all submodules called by `module.apply(variables, *args, **kwargs)`.

  In the order their calls start (so stage outputs come in network order).
  Runs under `jax.eval_shape`: no FLOPs are spent.
  """
  paths: list[str] = []

  def interceptor(next_fun, a, kw, context):
    if context.method_name == "__call__":
      p = "/".join(context.module.path)
      if p and p not in paths:
        paths.append(p)
    return next_fun(*a, **kw)

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      return module.apply(v, *a, mutable=True, **kwargs)

  jax.eval_shape(run, variables, *args)
  return paths


def child(parent: Any, name: str) -> Any:
  """The submodule (attribute, or list index for digits) `name` of an NNX module."""
  if name.isdigit() and not hasattr(parent, name):
    return parent[int(name)]
  if not hasattr(parent, name):
    raise ValueError(f"{type(parent).__name__} has no submodule {name!r}.")
  return getattr(parent, name)


def set_child(parent: Any, name: str, value: Any) -> None:
  """Sets the submodule `name` of an NNX module (bypassing NNX's attribute checks)."""
  if name.isdigit() and not hasattr(parent, name):
    parent[int(name)] = value
  else:
    object.__setattr__(parent, name, value)


@contextlib.contextmanager
def nnx_mix_at(model: Any, path: Path, lam: Any, perm: jax.Array, *,
               mesh: Optional[Mesh] = None, axis_name: mixing.AxisName = "data") -> Iterator[None]:
  """Within the block, the `flax.nnx` submodule at `path` outputs its mixed output.

  `path` names attributes (and list indices) from `model`, e.g. 'blocks/2'.
  The model is restored on exit, also on error.
  """
  parts = normalize_path(path)
  parent = model
  for name in parts[:-1]:
    parent = child(parent, name)

  def route(here, inner, args, kwargs):
    return mixing.mix_with_partner(inner(*args, **kwargs), perm, lam, mesh=mesh,
                                   axis_name=axis_name)

  with nnx_routed([(parts, parent, parts[-1])], route):
    yield


# ----------------------------------------------------------------------------
# Splitting an NNX pass at a submodule (the counterparts of `capture_below` / `inject_at`).


class NnxGraph(NamedTuple):
  """Where an NNX model's callable submodules and its non-Param, non-RngKey variables are.

  modules: `(path, parent, name)` of every callable submodule (all depths,
    `nnx.iter_graph` order; `name` an attribute or a list index as a string).
  state: `(path, nnx.Variable)` of the variables an NNX pass may update
    (batch statistics, RNG counters): what a capture snapshots.
  """
  modules: tuple[tuple[tuple[str, ...], Any, str], ...]
  state: tuple[tuple[tuple[Any, ...], Any], ...]

  def paths(self) -> list[str]:
    """The submodule paths, sorted: e.g. ['blocks/0', 'blocks/0/conv', ...]."""
    return sorted("/".join(p) for p, _, _ in self.modules)


def nnx_graph(model: Any) -> NnxGraph:
  """`NnxGraph` of `model`: walk it before any submodule is swapped for a stand-in.

  (`nnx.iter_graph` does not see through stand-ins, e.g. those of
  `adapters.nnx_call_hook` hooks, so a pass that uses both walks first.)
  """
  from flax import nnx
  nodes, modules, state = {}, [], []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      if not isinstance(node, (nnx.Param, nnx.RngKey)):
        state.append((tuple(path), node))
    else:
      nodes[tuple(str(p) for p in path)] = node
  for path, node in nodes.items():
    if path and isinstance(node, nnx.Module) and callable(node):
      modules.append((path, nodes[path[:-1]], path[-1]))
  return NnxGraph(tuple(modules), tuple(state))


class _Stand:
  """Stands in for an NNX submodule: its calls go to `route(path, inner, args, kwargs)`.

  Other attributes (and indexing, iteration, len) are the inner module's.
  """

  def __init__(self, inner: Any, path: tuple[str, ...], route: Any):
    self._stand = (inner, path, route)

  def __call__(self, *args, **kwargs):
    inner, path, route = self._stand
    return route(path, inner, args, kwargs)

  def __getattr__(self, name: str) -> Any:
    if name == "_stand":
      raise AttributeError(name)
    return getattr(self._stand[0], name)

  def __getitem__(self, index):
    return self._stand[0][index]

  def __iter__(self):
    return iter(self._stand[0])

  def __len__(self):
    return len(self._stand[0])


@contextlib.contextmanager
def nnx_routed(modules: Iterable[tuple[tuple[str, ...], Any, str]], route: Any
               ) -> Iterator[None]:
  """While active, each submodule `(path, parent, name)` of `modules` is a `_Stand` calling `route`.

  `modules` as `NnxGraph.modules` (or a part of it). Restored on exit, also
  on error. The module swapped is whatever is at the attribute now (it may
  be another stand-in, e.g. an `nnx_call_hook`'s).
  """
  swapped = []
  try:
    for path, parent, name in modules:
      inner = child(parent, name)
      set_child(parent, name, _Stand(inner, path, route))
      swapped.append((parent, name, inner))
    yield
  finally:
    for parent, name, inner in reversed(swapped):
      set_child(parent, name, inner)


def _nnx_target(graph: NnxGraph, path: Path) -> tuple[str, ...]:
  """`path` normalised; ValueError listing the model's submodule paths if it names none."""
  target = normalize_path(path)
  if target not in {p for p, _, _ in graph.modules}:
    raise ValueError(f"No callable NNX submodule at path {'/'.join(target)!r}; attribute paths "
                     f"of this model: {graph.paths()}.")
  return target


class NnxCapture(Capture):
  """What an NNX pass computes below the submodule at a path (`nnx_capture_below`).

  h, below, calls: as `Capture` (`variables` stays empty). state: an
  `nnx.State` of the model's non-Param, non-RngKey variables right after the
  point's call (the batch-statistics updates and RNG counters of the layers
  below it; the layout of `nnx.split(model, nnx.Param, nnx.RngKey, ...)`'s
  last part), None if the point was not reached.
  """

  def __init__(self):
    super().__init__()
    self.state: Any = None


def _nnx_snapshot(graph: NnxGraph) -> Any:
  """An `nnx.State` of copies of `graph.state`'s variables with their current values."""
  from flax import nnx
  return nnx.from_flat_state([(p, v.replace(v.get_value())) for p, v in graph.state])


@contextlib.contextmanager
def nnx_capture_below(model: Any, path: Path, graph: Optional[NnxGraph] = None
                      ) -> Iterator[NnxCapture]:
  """Within the block, records what a pass of the NNX `model` computes below `path`.

  The pass runs unchanged (every submodule's `__call__` goes through a
  stand-in; the model is restored on exit, also on error). Yields an
  `NnxCapture`, filled as the pass runs. Roles as `capture_below`'s: the
  ancestors of the point run, the top-level calls below it (those not nested
  in another such call) are recorded. Only `__call__`s are seen: other
  methods of submodules run as usual. `graph`: `nnx_graph(model)` walked
  earlier (default: now). With `nnx_inject_at` it lets a second pass start
  at `path`. Raises ValueError (listing the attribute paths) if `path` names
  no callable submodule.
  """
  graph = nnx_graph(model) if graph is None else graph
  target = _nnx_target(graph, path)
  cap = NnxCapture()

  def snapshot(role):
    if role == "point":
      cap.state = _nnx_snapshot(graph)

  def route(here, inner, args, kwargs):
    return cap.record(_role(here, "__call__", target), lambda: inner(*args, **kwargs), snapshot)

  with nnx_routed(graph.modules, route):
    yield cap


@contextlib.contextmanager
def nnx_inject_at(model: Any, path: Path, h: Any, below: Sequence[Any],
                  graph: Optional[NnxGraph] = None) -> Iterator[None]:
  """Within the block, a pass of the NNX `model` starts at the submodule at `path`: it outputs `h`.

  As `inject_at`: the submodule does not run, and the top-level calls below
  it return `below` (from `nnx_capture_below`, in order) without running.
  Start the pass from the capture's `state` so that the layers above see the
  encoder's batch-statistics updates and RNG counters. The model is restored
  on exit, also on error. Raises ValueError if `path` names no callable
  submodule, or on exit if the pass's calls do not match the capture's.
  """
  graph = nnx_graph(model) if graph is None else graph
  target = _nnx_target(graph, path)
  replay = _Replay(target, h, below)

  def route(here, inner, args, kwargs):
    return replay(_role(here, "__call__", target), lambda: inner(*args, **kwargs))

  with nnx_routed(graph.modules, route):
    yield
  replay.check()
