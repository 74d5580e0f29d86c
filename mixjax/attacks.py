"""Gradient attacks (FGSM, I-FGSM) and their evaluation, white-box and black-box.

Every attack takes a batched `apply_fn(x: f[B, ...]) -> logits f[B, C]` in
eval mode and int class ids, maximises the softmax cross-entropy of the true
class inside an l_inf or l2 ball of radius `eps` around each input, and keeps
the result inside the valid input range `[clip_min, clip_max]`.

White-box: the adversarial examples are made on the model under test.
Black-box (transfer): they are made on a *source* model and shown to other
models, whose apply functions are only ever called forward (never
differentiated): `evaluate` computes the examples from the source alone, then
runs every target on them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import checks

ApplyFn = Callable[[jax.Array], jax.Array]
NORMS = ("linf", "l2")
METHODS = ("fgsm", "ifgsm")


def _check(eps: float, norm: str, clip_min: Optional[float], clip_max: Optional[float]) -> float:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  try:
    eps = float(eps)
  except (TypeError, ValueError):
    raise ValueError(f"eps must be a number >= 0, got {eps!r}.") from None
  if not math.isfinite(eps) or eps < 0:
    raise ValueError(f"eps must be a finite number >= 0, got {eps!r}.")
  if (clip_min is None) != (clip_max is None):
    raise ValueError("clip_min and clip_max must both be given or both be None (no clipping).")
  if clip_min is not None and not float(clip_min) < float(clip_max):
    raise ValueError(f"need clip_min < clip_max, got {clip_min!r} and {clip_max!r}.")
  return eps


def _per_example_norm(v: jax.Array) -> jax.Array:
  """l2 norm over all non-batch axes, shaped to broadcast against `v`."""
  n = jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1))
  return n.reshape((-1,) + (1,) * (v.ndim - 1))


def loss_gradient(apply_fn: ApplyFn, x: jax.Array, labels: jax.Array) -> jax.Array:
  """`d/dx` of the softmax cross-entropy of the true class, per example: f32[B, ...]."""
  def total(v):
    logits = apply_fn(v).astype(jnp.float32)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))
  return jax.grad(total)(x)


def _step(grad: jax.Array, size: float, norm: str) -> jax.Array:
  if norm == "linf":
    return size * jnp.sign(grad)
  return size * grad / jnp.maximum(_per_example_norm(grad), 1e-12)


def _project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str, clip_min, clip_max):
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  else:
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_per_example_norm(delta), 1e-12))
  out = x + delta
  # Clipping to a box that holds x moves every coordinate towards x: still inside the ball.
  return out if clip_min is None else jnp.clip(out, clip_min, clip_max)


def _check_inputs(x, labels):
  checks.float_leaves("x", x)
  labels = jnp.asarray(labels) if not checks.is_traced(labels) else labels
  if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != x.shape[:1]:
    raise ValueError(f"labels must be int class ids of shape ({x.shape[0]},), got "
                     f"{labels.dtype}{tuple(labels.shape)}.")
  return labels


def _fgsm(apply_fn, x, labels, eps, norm, clip_min, clip_max):
  x_adv = x + _step(loss_gradient(apply_fn, x, labels), eps, norm).astype(x.dtype)
  return _project(x_adv, x, eps, norm, clip_min, clip_max)


def _ifgsm(apply_fn, x, labels, eps, steps, size, norm, clip_min, clip_max):
  def body(_, x_adv):
    g = loss_gradient(apply_fn, x_adv, labels)
    return _project(x_adv + _step(g, size, norm).astype(x.dtype), x, eps, norm, clip_min,
                    clip_max)
  return jax.lax.fori_loop(0, steps, body, x)


def _check_steps(steps: int, step_size: Optional[float], eps: float) -> tuple[int, float]:
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
  size = eps / steps if step_size is None else float(step_size)
  if not size >= 0:
    raise ValueError(f"step_size must be >= 0, got {step_size!r}.")
  return int(steps), size


def fgsm(apply_fn: ApplyFn, x: jax.Array, labels: jax.Array, eps: float, *,
         norm: str = "linf", clip_min: Optional[float] = 0.0,
         clip_max: Optional[float] = 1.0) -> jax.Array:
  """Fast gradient (sign) method, Goodfellow et al. (2015).

  linf: `x + eps * sign(grad)`; l2: `x + eps * grad / |grad|`; then clipped
  to `[clip_min, clip_max]` (None, None: no clipping).

  Args:
    apply_fn: batched model `f[B, ...] -> logits f[B, C]` (eval mode).
    x: inputs f[B, ...] inside the valid range; labels: int[B] true classes.
    eps: the attack radius (in input units).
  Returns:
    Adversarial inputs, same shape and dtype as `x`.
  """
  eps = _check(eps, norm, clip_min, clip_max)
  labels = _check_inputs(x, labels)
  return _fgsm(apply_fn, x, labels, eps, norm, clip_min, clip_max)


def ifgsm(apply_fn: ApplyFn, x: jax.Array, labels: jax.Array, eps: float, *,
          steps: int = 10, step_size: Optional[float] = None, norm: str = "linf",
          clip_min: Optional[float] = 0.0, clip_max: Optional[float] = 1.0) -> jax.Array:
  """Iterative FGSM (Kurakin et al. 2017): `steps` FGSM steps of `step_size` each.

  After every step the result is projected back onto the `eps`-ball around
  `x` and into `[clip_min, clip_max]`. `step_size` defaults to `eps / steps`
  (the mixup paper's "10 iterations with equal step size").

  Args:
    apply_fn: batched model `f[B, ...] -> logits f[B, C]` (eval mode).
    x: inputs f[B, ...]; labels: int[B].
    eps: radius; steps: number of iterations (>= 1).
  Returns:
    Adversarial inputs, same shape and dtype as `x`.
  """
  eps = _check(eps, norm, clip_min, clip_max)
  labels = _check_inputs(x, labels)
  steps, size = _check_steps(steps, step_size, eps)
  return _ifgsm(apply_fn, x, labels, eps, steps, size, norm, clip_min, clip_max)


class Attack(NamedTuple):
  """An attack configuration: method 'fgsm' or 'ifgsm', norm 'linf' or 'l2', radius eps."""
  method: str = "fgsm"
  eps: float = 4.0 / 255.0
  norm: str = "linf"
  steps: int = 10
  step_size: Optional[float] = None
  clip_min: Optional[float] = 0.0
  clip_max: Optional[float] = 1.0

  def __call__(self, apply_fn: ApplyFn, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Adversarial examples for `x` made on `apply_fn`."""
    if self.method == "fgsm":
      return fgsm(apply_fn, x, labels, self.eps, norm=self.norm, clip_min=self.clip_min,
                  clip_max=self.clip_max)
    if self.method == "ifgsm":
      return ifgsm(apply_fn, x, labels, self.eps, steps=self.steps, step_size=self.step_size,
                   norm=self.norm, clip_min=self.clip_min, clip_max=self.clip_max)
    raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")


@functools.partial(jax.jit, static_argnames=("apply_fn", "method", "norm", "steps", "clip_min",
                                             "clip_max"))
def _run(x, labels, eps, size, *, apply_fn, method, norm, steps, clip_min, clip_max):
  """One compilation per (model, method, norm, steps, range, shapes); eps and size are inputs.

  jit's own cache, keyed by the static arguments (`apply_fn` by identity), keeps it.
  """
  if method == "fgsm":
    return _fgsm(apply_fn, x, labels, eps, norm, clip_min, clip_max)
  return _ifgsm(apply_fn, x, labels, eps, steps, size, norm, clip_min, clip_max)


def make_attack(apply_fn: ApplyFn, attack: Attack) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Compiled `(x, labels) -> x_adv` for one model and attack.

  The compilation is shared by attacks that differ only in `eps` / `step_size`.
  """
  eps = _check(attack.eps, attack.norm, attack.clip_min, attack.clip_max)
  if attack.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {attack.method!r}.")
  steps, size = _check_steps(attack.steps, attack.step_size, eps)
  static = dict(apply_fn=apply_fn, method=attack.method, norm=attack.norm, steps=steps,
                clip_min=attack.clip_min, clip_max=attack.clip_max)

  def attack_fn(x, labels):
    labels = _check_inputs(x, labels)
    return _run(x, labels, jnp.float32(eps), jnp.float32(size), **static)
  return attack_fn


@functools.partial(jax.jit, static_argnames="apply_fn")
def _forward(x: jax.Array, *, apply_fn: ApplyFn) -> jax.Array:
  """`apply_fn(x)`, compiled once per (apply function, input shape) by jit's cache."""
  return apply_fn(x)


def topk_errors(logits: jax.Array, labels: jax.Array,
                ks: Iterable[int] = (1, 5)) -> dict[int, jax.Array]:
  """Per-example top-k errors {k: f32[B]} (1 if the true class is not among the k best).

  k larger than the number of classes counts every example as correct.
  """
  logits = jnp.asarray(logits)
  ks = tuple(int(k) for k in ks)
  kmax = min(max(ks), logits.shape[-1])
  top = jax.lax.top_k(logits, kmax)[1]
  hit = top == labels[:, None]
  return {k: 1.0 - jnp.any(hit[:, :min(k, kmax)], axis=-1).astype(jnp.float32) for k in ks}


class Result(NamedTuple):
  """Errors (fractions in [0, 1]) of one target model: top1, top5, and clean top1."""
  top1: float
  top5: float
  clean_top1: float


def evaluate(source: ApplyFn, targets: Mapping[str, ApplyFn], x: np.ndarray, labels: np.ndarray,
             attack: Attack, *, batch_size: int = 256) -> dict[str, Result]:
  """Top-1/top-5 errors of each target on adversarial examples made on `source`.

  White-box: include the source itself among `targets`. The examples are made
  from `source` (and its gradients) only; each target is then called forward
  on them (jitted, never differentiated).

  Args:
    source: apply function the attack differentiates.
    targets: {name: apply function} evaluated on the adversarial examples.
    x: inputs f[N, ...] (NumPy or jax); labels: int[N].
    attack: the `Attack`; batch_size: examples per jitted call.
  Returns:
    {name: Result}.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  x, labels = np.asarray(x), np.asarray(labels)
  if len(x) != len(labels) or len(x) == 0:
    raise ValueError(f"x and labels must be non-empty and of equal length, got {len(x)} and "
                     f"{len(labels)}.")
  make = make_attack(source, attack)
  forward = {name: functools.partial(_forward, apply_fn=fn) for name, fn in targets.items()}
  sums = {name: np.zeros(3) for name in targets}
  for start in range(0, len(x), batch_size):
    xb, yb = jnp.asarray(x[start:start + batch_size]), jnp.asarray(labels[start:start + batch_size])
    x_adv = make(xb, yb)
    for name, fn in forward.items():
      adv = topk_errors(fn(x_adv), yb)
      clean = topk_errors(fn(xb), yb, ks=(1,))
      sums[name] += np.array([float(jnp.sum(adv[1])), float(jnp.sum(adv[5])),
                              float(jnp.sum(clean[1]))])
  return {name: Result(*(s / len(x))) for name, s in sums.items()}


def table3(white: Mapping[str, Mapping[str, Result]],
           black: Optional[Mapping[str, Mapping[str, Result]]] = None, *, digits: int = 1) -> str:
  """Markdown in the layout of the mixup paper's Table 3 (errors in %).

  Args:
    white: {attack name ('FGSM', 'I-FGSM'): {model: Result}}, each model attacked itself.
    black: {attack name: {model: Result}}, examples made on a separate source model
      (None or empty: no black-box table).
  Returns:
    Markdown: "(a) White box attacks." and (given `black`) "(b) Black box attacks.".
  """
  def one(title, results):
    attacks = list(results)
    models = list(next(iter(results.values()))) if results else []
    head = "| Metric | Method | " + " | ".join(attacks) + " |"
    rows = [head, "|" + "---|" * (2 + len(attacks))]
    for metric in ("top1", "top5"):
      for i, m in enumerate(models):
        label = ("Top-1" if metric == "top1" else "Top-5") if i == 0 else ""
        vals = [f"{100 * getattr(results[a][m], metric):.{digits}f}" for a in attacks]
        rows.append(f"| {label} | {m} | " + " | ".join(vals) + " |")
    return f"{title}\n\n" + "\n".join(rows)
  text = one("(a) White box attacks.", white)
  return text + "\n\n" + one("(b) Black box attacks.", black) if black else text
