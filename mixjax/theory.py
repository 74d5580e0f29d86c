"""The mixup loss as a regularised loss, and the robustness it buys (Zhang et al. 2021).

"How does mixup help with robustness and generalization?" (ICLR 2021) studies
losses of the form `l(x, y) = h(f(x)) - y . f(x)` (logistic regression,
softmax cross-entropy, GLMs) with `f(x)` a model's outputs f32[m] and `y`
f32[m] targets. Its Lemma 3.1 writes the mixup loss (lam ~ Beta(alpha, beta))
as the standard loss plus three regularisers, up to terms of third order in
`1 - lam`, with `lam ~ D_lam = a/(a+b) Beta(a+1, b) + b/(a+b) Beta(b+1, a)` and
`r` drawn from the training inputs:

  R1 = E[1-lam]/n     sum_i (h'(f(x_i)) - y_i)^T J(x_i) E_r[r - x_i]
  R2 = E[(1-lam)^2]/2n sum_i E_r[(J(x_i)(r-x_i))^T h''(f(x_i)) J(x_i)(r-x_i)]
  R3 = E[(1-lam)^2]/2n sum_i (h'(f(x_i)) - y_i)^T E_r[D^2 f(x_i)[r-x_i, r-x_i]]

Everything here works on any batched model `apply_fn(x: f[B, ...]) -> f[B, m]`
(or f[B] for one output) whose outputs for one example do not depend on the
others (eval mode). Directional derivatives are nested `jax.jvp`s and
Hessian-vector products: no Jacobian or Hessian is ever formed.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import checks
from mixjax import sampling

ApplyFn = Callable[[jax.Array], jax.Array]
Link = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- links h


def logistic_link(z: jax.Array) -> jax.Array:
  """`h(z) = sum log(1 + e^z)`: with y in {0, 1}, `h(z) - y z` is the logistic loss."""
  return jnp.sum(jax.nn.softplus(z))


def softmax_link(z: jax.Array) -> jax.Array:
  """`h(z) = logsumexp(z)`: with one-hot (or soft) y, `h(z) - y . z` is cross-entropy."""
  return jax.nn.logsumexp(z)


def squared_link(z: jax.Array) -> jax.Array:
  """`h(z) = |z|^2 / 2`: `h(z) - y . z` is least squares up to a term free of `z`."""
  return 0.5 * jnp.sum(jnp.square(z))


_LINKS = {"logistic": logistic_link, "softmax": softmax_link, "squared": squared_link}


def get_link(link: Union[str, Link]) -> Link:
  """A link `h` by name ('logistic', 'softmax', 'squared') or the callable itself."""
  if callable(link):
    return link
  if link not in _LINKS:
    raise ValueError(f"Unknown link {link!r}; choose one of {sorted(_LINKS)} or pass a callable "
                     "h: f32[m] -> f32[].")
  return _LINKS[link]


def glm_loss(link: Union[str, Link], outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example `h(f) - y . f`: f32[n] from outputs f[n, m] and targets f[n, m]."""
  h = get_link(link)
  return jax.vmap(h)(outputs) - jnp.sum(targets * outputs, axis=-1)


# ----------------------------------------------------------------------------- D_lam


def d_lam_moments(alpha: float, beta: Optional[float] = None) -> tuple[float, float]:
  """`(E[1 - lam], E[(1 - lam)^2])` for `lam ~ D_lam` of Beta(alpha, beta)."""
  return (sampling.expected_one_minus_lam(alpha, beta),
          sampling.expected_sq_one_minus_lam(alpha, beta))


def sample_d_lam(key: jax.Array, alpha: float, beta: Optional[float] = None,
                 shape: tuple[int, ...] = (), dtype=jnp.float32) -> jax.Array:
  """Draws `lam ~ D_lam = a/(a+b) Beta(a+1, b) + b/(a+b) Beta(b+1, a)`: float[shape]."""
  a = checks.positive_number("alpha", alpha)
  b = a if beta is None else checks.positive_number("beta", beta)
  return _sample_d_lam(key, a, b, tuple(int(s) for s in shape), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _sample_d_lam(key, a, b, shape, dtype):
  k_pick, k_1, k_2 = jax.random.split(key, 3)
  first = jax.random.bernoulli(k_pick, a / (a + b), shape)
  return jnp.where(first, jax.random.beta(k_1, a + 1.0, b, shape, dtype),
                   jax.random.beta(k_2, b + 1.0, a, shape, dtype))


# ----------------------------------------------------------------------------- helpers


def _as_2d_targets(y: jax.Array, n: int, dtype) -> jax.Array:
  y = jnp.asarray(y, dtype)
  if y.ndim == 1:
    y = y[:, None]
  if y.ndim != 2 or y.shape[0] != n:
    raise ValueError(f"y must be targets f32[n={n}, m] (or f32[n] for one output), "
                     f"got shape {y.shape}.")
  return y


def _outputs_2d(apply_fn: ApplyFn) -> ApplyFn:
  def fn(x):
    out = jnp.asarray(apply_fn(x))
    out = out if jnp.issubdtype(out.dtype, jnp.floating) else out.astype(jnp.float32)
    return out[:, None] if out.ndim == 1 else out
  return fn


def _check_xy(apply_fn: ApplyFn, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = _floats("x", x)
  if x.ndim < 2:
    raise ValueError(f"x must be inputs f[n, ...] with a leading example axis, got {x.shape}.")
  n = x.shape[0]
  y = _as_2d_targets(y, n, x.dtype)
  m = jax.eval_shape(_outputs_2d(apply_fn), x[:1]).shape[-1]
  if y.shape[1] != m:
    raise ValueError(f"y has {y.shape[1]} columns but the model has {m} outputs; they must match.")
  return x, y


def _floats(name: str, x) -> jax.Array:
  """`x` as a jax array of its own float dtype (f32, or f64 under `jax.enable_x64`)."""
  x = jnp.asarray(x)
  checks.float_leaves(name, x)
  return x


def _map(fn, xs, batch_size: Optional[int]):
  """`jax.vmap(fn)(xs)`, or `lax.map` in chunks of `batch_size` (bounded memory)."""
  if batch_size is None:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


def _check_batch_size(batch_size: Optional[int]) -> Optional[int]:
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  return batch_size


# ----------------------------------------------------------------------------- Lemma 3.1


class MixupTerms(NamedTuple):
  """The quadratic approximation of the mixup loss (Lemma 3.1), all f32[].

  standard: the standard empirical loss; r1, r2, r3: the regularisers.
  `approx` = standard + r1 + r2 + r3 (the paper's L~_mix).
  """
  standard: jax.Array
  r1: jax.Array
  r2: jax.Array
  r3: jax.Array

  @property
  def approx(self) -> jax.Array:
    return self.standard + self.r1 + self.r2 + self.r3


def directional_derivatives(apply_fn: ApplyFn, x: jax.Array,
                            directions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and second derivatives of `f(x + t v)` at t = 0 for every direction `v`.

  Args:
    apply_fn: batched model, `f[B, ...] -> f[B, m]` (or f[B]).
    x: one input f[...] (no batch axis).
    directions: f[k, ...] directions v.
  Returns:
    `(J v, v^T (d^2 f) v)`, each f32[k, m]: two nested forward-mode passes.
  """
  fn = _outputs_2d(apply_fn)
  g = lambda t: fn(x[None] + t * directions)  # noqa: E731
  first = lambda t: jax.jvp(g, (t,), (jnp.ones_like(t),))[1]  # noqa: E731
  t0 = jnp.zeros((), directions.dtype)
  return jax.jvp(first, (t0,), (jnp.ones_like(t0),))


CENTERS = ("lam1", "mean")


def quadratic_terms(apply_fn: ApplyFn, link: Union[str, Link], x: jax.Array, y: jax.Array,
                    alpha: float, beta: Optional[float] = None, *,
                    references: Optional[jax.Array] = None,
                    batch_size: Optional[int] = None, center: str = "lam1") -> MixupTerms:
  """Lemma 3.1: the standard loss and R1, R2, R3 of the mixup loss with Beta(alpha, beta).

  Lemma 3.1 writes the mixup loss exactly as `1/n sum_i E_{lam ~ D_lam, r} l_i(x~_i)`,
  `x~_i = x_i + (1 - lam)(r - x_i)`, `l_i(v) = h(f(v)) - y_i . f(v)`, and expands each
  `l_i` to second order. `center` says around which point:

  - 'lam1' (the paper's): at lam = 1, i.e. around `x_i`. `standard` is the standard
    loss, and with `v_r = r - x_i`, `e1 = E[1-lam]`, `e2 = E[(1-lam)^2]`:
    `r1 = e1/n sum_i (h'(f(x_i)) - y_i)^T J E_r v_r`, `r2 = e2/2n sum_i E_r (J v_r)^T h''
    (J v_r)`, `r3 = e2/2n sum_i (h' - y_i)^T E_r D^2 f[v_r, v_r]`, all at `x_i`.
  - 'mean': around the mean mixed input `m_i = E[x~_i] = x_i + e1 (r_bar - x_i)`
    (`r_bar` the mean reference). The first-order term vanishes (`r1 = 0`), `standard`
    is `1/n sum_i l_i(m_i)`, and with `delta = x~_i - m_i`, `E[delta delta^T] = e2 E_r
    v_r v_r^T - e1^2 v_bar v_bar^T` (`v_bar = r_bar - x_i`): `r2` and `r3` are the
    terms above at `m_i` with `e2 E_r[q(v_r)]` replaced by `e2 E_r[q(v_r)] - e1^2
    q(v_bar)` for each quadratic form `q`.

  Args:
    apply_fn: batched model `f[B, ...] -> f[B, m]` (or f[B]); eval mode.
    link: `h` ('logistic', 'softmax', 'squared' or a callable f32[m] -> f32[]).
    x: training inputs f[n, ...]; y: targets f32[n, m] (f32[n] for one output).
    alpha, beta: the mixing distribution Beta(alpha, beta) (beta defaults to alpha).
    references: the inputs `r` are drawn from, f[n_r, ...] (default: `x`, the
      empirical distribution of the paper; pass a subsample for large n).
    batch_size: examples `i` processed at once (memory: batch_size * n_r inputs);
      None: all n at once (`jax.vmap`).
    center: 'lam1' (default, Lemma 3.1) or 'mean' (see above).
  Returns:
    `MixupTerms` (f32[] each); `.approx` is the quadratic approximation.

  Cost: 2 nested JVPs per pair (i, r) plus Hessian-vector products of `h`.
  """
  if center not in CENTERS:
    raise ValueError(f"center must be one of {CENTERS}, got {center!r}.")
  x, y = _check_xy(apply_fn, x, y)
  batch_size = _check_batch_size(batch_size)
  h = get_link(link)
  refs = x if references is None else _floats("references", references).astype(x.dtype)
  if refs.shape[1:] != x.shape[1:] or refs.shape[0] < 1:
    raise ValueError(f"references must be f[n_r, {', '.join(map(str, x.shape[1:]))}], "
                     f"got {refs.shape}.")
  e1, e2 = d_lam_moments(alpha, beta)
  fn = _outputs_2d(apply_fn)
  grad_h = jax.grad(h)

  def forms(xi, fi, yi, directions):
    """Per direction v: ((h' - y)^T J v, (J v)^T h'' (J v), (h' - y)^T D^2 f[v, v]) at xi."""
    d1, d2 = directional_derivatives(fn, xi, directions)
    resid = grad_h(fi) - yi                                   # h'(f(x_i)) - y_i, f32[m]
    hd1 = jax.vmap(lambda u: jax.jvp(grad_h, (fi,), (u,))[1])(d1)  # h''(f) J v, f32[k, m]
    return d1 @ resid, jnp.sum(d1 * hd1, axis=-1), d2 @ resid

  if center == "lam1":
    points = x
  else:
    points = x + e1 * (jnp.mean(refs, axis=0)[None] - x)      # m_i
  outputs = fn(points)

  def per_example(args):
    xi, pi, fi, yi = args
    t1, t2, t3 = forms(pi, fi, yi, refs - xi[None])
    if center == "lam1":
      return jnp.mean(t1), e2 * jnp.mean(t2), e2 * jnp.mean(t3)
    _, b2, b3 = forms(pi, fi, yi, (jnp.mean(refs, axis=0) - xi)[None])
    return (jnp.zeros((), t1.dtype), e2 * jnp.mean(t2) - e1 ** 2 * b2[0],
            e2 * jnp.mean(t3) - e1 ** 2 * b3[0])

  t1, t2, t3 = _map(per_example, (x, points, outputs, y), batch_size)
  standard = jnp.mean(glm_loss(h, outputs, y))
  return MixupTerms(standard, e1 * jnp.mean(t1), 0.5 * jnp.mean(t2), 0.5 * jnp.mean(t3))


def approximate_mixup_loss(apply_fn: ApplyFn, link: Union[str, Link], x: jax.Array,
                           y: jax.Array, alpha: float, beta: Optional[float] = None,
                           **kwargs) -> jax.Array:
  """`L~_mix = L_std + R1 + R2 + R3` (f32[]), differentiable in the model's parameters
  (`center='mean'`: the expansion around the mean mixed input, see `quadratic_terms`)."""
  return quadratic_terms(apply_fn, link, x, y, alpha, beta, **kwargs).approx


# ----------------------------------------------------------------------------- the mixup loss


def beta_quadrature(alpha: float, beta: Optional[float] = None,
                    num_nodes: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Gauss-Jacobi nodes and weights for `E_{lam ~ Beta(alpha, beta)}[g(lam)]`.

  Returns `(lam f64[num_nodes], weights f64[num_nodes])`, weights summing to 1;
  exact for polynomials `g` of degree < 2 * num_nodes.
  """
  from scipy import special
  a = checks.positive_number("alpha", alpha)
  b = a if beta is None else checks.positive_number("beta", beta)
  if int(num_nodes) != num_nodes or num_nodes < 1:
    raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}.")
  # lam = (1 + t) / 2: lam^(a-1) (1-lam)^(b-1) is the Jacobi weight (1-t)^(b-1) (1+t)^(a-1).
  t, w = special.roots_jacobi(int(num_nodes), b - 1.0, a - 1.0)
  return (1.0 + t) / 2.0, w / np.sum(w)


def mixup_loss_exact(apply_fn: ApplyFn, link: Union[str, Link], x: jax.Array, y: jax.Array,
                     alpha: float, beta: Optional[float] = None, *, num_nodes: int = 32,
                     batch_size: Optional[int] = None) -> jax.Array:
  """The mixup loss of Eq. (1): `1/n^2 sum_ij E_lam l(x_ij(lam), y_ij(lam))`.

  `x_ij(lam) = lam x_i + (1 - lam) x_j`, `y_ij(lam) = lam y_i + (1 - lam) y_j`.

  All n^2 pairs, and Gauss-Jacobi quadrature with `num_nodes` nodes over
  lam ~ Beta(alpha, beta): deterministic, and differentiable in the model's
  parameters. Cost: n^2 * num_nodes forward passes (`batch_size` rows i at a
  time; None: all at once).
  """
  x, y = _check_xy(apply_fn, x, y)
  batch_size = _check_batch_size(batch_size)
  h = get_link(link)
  lam, w = beta_quadrature(alpha, beta, num_nodes)
  lam, w = jnp.asarray(lam, x.dtype), jnp.asarray(w, x.dtype)
  fn = _outputs_2d(apply_fn)
  n, shape = x.shape[0], x.shape[1:]
  lam_x = lam.reshape((1, -1) + (1,) * len(shape))

  def row(args):
    xi, yi = args
    mixed = lam_x * xi[None, None] + (1 - lam_x) * x[:, None]          # [n, Q, ...]
    targets = lam[None, :, None] * yi + (1 - lam[None, :, None]) * y[:, None]
    out = fn(mixed.reshape((-1,) + shape))
    losses = glm_loss(h, out, targets.reshape(out.shape)).reshape(n, -1)
    return jnp.mean(losses @ w)

  return jnp.mean(_map(row, (x, y), batch_size))


def mixup_loss_monte_carlo(key: jax.Array, apply_fn: ApplyFn, link: Union[str, Link],
                           x: jax.Array, y: jax.Array, alpha: float,
                           beta: Optional[float] = None, *,
                           num_samples: int = 4096) -> tuple[jax.Array, jax.Array]:
  """A Monte-Carlo estimate of the mixup loss of Eq. (1) and its standard error.

  Draws `num_samples` triples (i, j, lam), i, j uniform over the n examples,
  lam ~ Beta(alpha, beta). Returns `(estimate f32[], standard error f32[])`.
  """
  x, y = _check_xy(apply_fn, x, y)
  if int(num_samples) != num_samples or num_samples < 2:
    raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}.")
  h = get_link(link)
  sampling.sample_beta(jax.random.key(0), alpha, beta)  # Validates alpha, beta eagerly.
  n = x.shape[0]

  @jax.jit
  def estimate(key, x, y):
    k_i, k_j, k_lam = jax.random.split(key, 3)
    i = jax.random.randint(k_i, (num_samples,), 0, n)
    j = jax.random.randint(k_j, (num_samples,), 0, n)
    lam = sampling.sample_beta(k_lam, alpha, beta, (num_samples,), dtype=x.dtype)
    lx = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    mixed = lx * x[i] + (1 - lx) * x[j]
    targets = lam[:, None] * y[i] + (1 - lam[:, None]) * y[j]
    losses = glm_loss(h, _outputs_2d(apply_fn)(mixed), targets)
    return jnp.mean(losses), jnp.std(losses) / math.sqrt(num_samples)

  return estimate(key, x, y)


def standard_loss(apply_fn: ApplyFn, link: Union[str, Link], x: jax.Array,
                  y: jax.Array) -> jax.Array:
  """The standard empirical loss `1/n sum_i h(f(x_i)) - y_i . f(x_i)`: f32[]."""
  x, y = _check_xy(apply_fn, x, y)
  return jnp.mean(glm_loss(link, _outputs_2d(apply_fn)(x), y))


# ----------------------------------------------------------------------------- Lemma 3.2, Thm 3.1


def input_gradients(apply_fn: ApplyFn, x: jax.Array) -> jax.Array:
  """`grad_x f(x_i)` for a model with one output: f32[n, ...] (one reverse pass)."""
  fn = _outputs_2d(apply_fn)
  if jax.eval_shape(fn, x[:1]).shape[-1] != 1:
    raise ValueError("input_gradients needs a model with one output (f[B] or f[B, 1]).")
  return jax.grad(lambda v: jnp.sum(fn(v)))(x)


def adversarial_loss_approx(apply_fn: ApplyFn, link: Union[str, Link], x: jax.Array,
                            y: jax.Array, radius: Union[float, jax.Array]) -> jax.Array:
  """Second-order approximation of the l2 adversarial loss (Lemma 3.2 and Eq. (6)).

  `1/n sum_i l_i + eta_i |h'(f_i) - y_i| |grad f_i| + eta_i^2/2 |h''(f_i)| |grad f_i|^2`,
  the maximum over `|delta| <= eta_i` of the second-order Taylor expansion of
  `l(x_i + delta)` when `f` is linear in x near x_i (logistic regression; ReLU
  networks almost everywhere). One model output only (binary classification).

  Args:
    apply_fn: batched model with one output, f[B, ...] -> f[B] (or f[B, 1]).
    link: `h` (e.g. 'logistic'). x: f[n, ...]; y: f32[n] (or f32[n, 1]).
    radius: the l2 radius eta >= 0: a number or f32[n] (e.g. `eps * sqrt(d)`).
  Returns:
    f32[].
  """
  x, y = _check_xy(apply_fn, x, y)
  if y.shape[1] != 1:
    raise ValueError("adversarial_loss_approx needs one model output (binary classification).")
  eta = jnp.asarray(radius, x.dtype)
  checks.check_array(eta, lambda v: v >= 0, "radius must be >= 0.")
  h = get_link(link)
  out = _outputs_2d(apply_fn)(x)
  grad_norm = jnp.sqrt(jnp.sum(jnp.square(input_gradients(apply_fn, x)).reshape(x.shape[0], -1),
                               axis=-1))
  hp = jax.vmap(jax.grad(h))(out)[:, 0]
  hpp = jax.vmap(lambda z: jax.jvp(jax.grad(h), (z,), (jnp.ones_like(z),))[1])(out)[:, 0]
  losses = glm_loss(h, out, y)
  return jnp.mean(losses + eta * jnp.abs(hp - y[:, 0]) * grad_norm
                  + 0.5 * eta ** 2 * jnp.abs(hpp) * grad_norm ** 2)


class MixupRadius(NamedTuple):
  """Theorem 3.1's radius for logistic regression f(x) = x^T theta (all f32).

  eps_mix: `R * c_x * E[1-lam]`; cos_min: `R = min_i |cos(theta, x_i)|`;
  c_x: `min_i |x_i| / sqrt(d)`; eps_i: f32[n], `|cos(theta, x_i)| c_x E[1-lam]`;
  l2_radius: `eps_mix * sqrt(d)`, the l2 attack size the mixup loss bounds.
  """
  eps_mix: jax.Array
  cos_min: jax.Array
  c_x: jax.Array
  eps_i: jax.Array
  l2_radius: jax.Array


def mixup_radius(theta: jax.Array, x: jax.Array, alpha: float,
                 beta: Optional[float] = None) -> MixupRadius:
  """Theorem 3.1: the l2 radius `eps_mix * sqrt(d)` whose adversarial loss mixup bounds.

  Args:
    theta: f[d] weights of logistic regression `f(x) = x^T theta`.
    x: f[n, d] training inputs (the theorem takes them centred, `mean_i x_i = 0`).
    alpha, beta: the mixup distribution Beta(alpha, beta).
  Returns:
    `MixupRadius`.
  """
  theta = _floats("theta", theta)
  x = _floats("x", x).astype(theta.dtype)
  if theta.ndim != 1 or x.ndim != 2 or x.shape[1] != theta.shape[0]:
    raise ValueError(f"need theta f[d] and x f[n, d]; got {theta.shape} and {x.shape}.")
  checks.check_array(theta, lambda t: (t != 0).any(),
                     "theta must not be zero (cos(theta, x) is undefined).")
  norms = jnp.linalg.norm(x, axis=1)
  checks.check_array(norms, lambda v: v > 0, "every x_i must be non-zero.")
  cos = jnp.abs(x @ theta) / (norms * jnp.linalg.norm(theta))
  d = x.shape[1]
  c_x = jnp.min(norms) / math.sqrt(d)
  e1 = sampling.expected_one_minus_lam(alpha, beta)
  eps_i = cos * c_x * e1
  eps_mix = jnp.min(cos) * c_x * e1
  return MixupRadius(eps_mix, jnp.min(cos), c_x, eps_i, eps_mix * math.sqrt(d))
