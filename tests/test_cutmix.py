"""CutMix and mixup/CutMix switching: boxes and coefficients against NumPy references."""

import jax
import numpy as np
import pytest
from scipy import stats

from mixjax import methods, mixing, policies

H, W = 12, 10


def _boxes(mask):
  """(y0, y1, x0, x1, area) of the zero box of each mask f[N, H, W, 1], recomputed in NumPy."""
  out = []
  for m in np.asarray(mask)[..., 0]:
    zero = m == 0
    rows, cols = np.where(zero.any(1))[0], np.where(zero.any(0))[0]
    if not len(rows):
      out.append((0, 0, 0, 0, 0))
      continue
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert zero[y0:y1, x0:x1].all() and zero.sum() == (y1 - y0) * (x1 - x0)  # A rectangle.
    assert np.all((m == 0) | (m == 1))
    out.append((y0, y1, x0, x1, (y1 - y0) * (x1 - x0)))
  return np.array(out)


def _timm_kept_area(rng, alpha, n):
  """timm's `rand_bbox` + `correct_lam`, in NumPy: the kept area of n boxes."""
  lam = rng.beta(alpha, alpha, n)
  ratio = np.sqrt(1 - lam)
  ch, cw = (H * ratio).astype(int), (W * ratio).astype(int)
  cy, cx = rng.integers(0, H, n), rng.integers(0, W, n)
  y0, y1 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
  x0, x1 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
  return 1 - (y1 - y0) * (x1 - x0) / (H * W)


def test_box_area_and_corrected_lam_against_numpy():
  c = jax.jit(lambda k: policies.cutmix(1.0, (H, W))(k, 4000))(jax.random.key(0))
  assert c.lam_x.shape == (4000, H, W, 1) and c.lam_y.shape == (4000,)
  b = _boxes(c.lam_x)
  np.testing.assert_allclose(c.lam_y, 1 - b[:, 4] / (H * W), atol=1e-6)
  ref = _timm_kept_area(np.random.default_rng(0), 1.0, 4000)
  # Discrete values: round both so float32 and float64 copies of a value tie.
  assert stats.ks_2samp(np.round(np.asarray(c.lam_y, np.float64), 5),
                        np.round(ref, 5)).pvalue > 1e-3


def test_uncorrected_lam_is_beta_and_sets_the_box_side():
  alpha = 0.7
  c = policies.cutmix(alpha, (H, W), correct_lam=False)(jax.random.key(1), 3000)
  lam = np.asarray(c.lam_y, np.float64)
  assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
  b = _boxes(c.lam_x)
  side_h = 2 * ((H * np.sqrt(1 - lam)).astype(int) // 2)
  side_w = 2 * ((W * np.sqrt(1 - lam)).astype(int) // 2)
  assert np.all(b[:, 1] - b[:, 0] <= side_h) and np.all(b[:, 3] - b[:, 2] <= side_w)
  inside = (b[:, 0] > 0) & (b[:, 1] < H) & (side_h > 0) & (side_w > 0)
  assert inside.sum() > 100
  np.testing.assert_array_equal((b[:, 1] - b[:, 0])[inside], side_h[inside])


def test_minmax_boxes_are_uniform_inside_the_image():
  lo, hi = 0.2, 0.8
  c = policies.cutmix(1.0, (H, W), minmax=(lo, hi))(jax.random.key(2), 3000)
  b = _boxes(c.lam_x)
  hs, ws = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
  assert hs.min() == int(H * lo) and hs.max() == int(H * hi) - 1
  assert ws.min() == int(W * lo) and ws.max() == int(W * hi) - 1
  counts = np.bincount(hs - int(H * lo))
  assert stats.chisquare(counts).pvalue > 1e-3
  np.testing.assert_allclose(c.lam_y, 1 - hs * ws / (H * W), atol=1e-6)


def test_switch_and_apply_probabilities():
  n, alpha_m = 4000, 0.4
  pol = policies.cutmix(1.0, (H, W), mixup_alpha=alpha_m, switch_prob=0.3, apply_prob=0.8)
  c = pol(jax.random.key(3), n)
  m = np.asarray(c.lam_x)[..., 0]
  flat = m.reshape(n, -1)
  skipped = np.all(flat == 1, axis=1) & (np.asarray(c.lam_y) == 1)
  constant = np.all(flat == flat[:, :1], axis=1) & ~skipped
  binary = ~constant & ~skipped
  # A CutMix box can be empty (lam near 1): count it with the skipped ones.
  assert abs(binary.mean() - 0.8 * 0.3) < 0.03
  assert abs(constant.mean() - 0.8 * 0.7) < 0.03
  lam_mix = flat[constant, 0]
  np.testing.assert_allclose(np.asarray(c.lam_y)[constant], lam_mix, atol=1e-6)
  assert stats.kstest(lam_mix.astype(np.float64), stats.beta(alpha_m, alpha_m).cdf).pvalue > 1e-3


def test_per_batch_one_box_for_all():
  pol = policies.cutmix(1.0, (H, W), per_example=False)
  for seed in range(5):
    c = pol(jax.random.key(seed), 5)
    assert c.lam_y.shape == () and c.lam_x.shape == (5, H, W, 1)
    np.testing.assert_array_equal(c.lam_x, np.broadcast_to(c.lam_x[:1], c.lam_x.shape))
    np.testing.assert_allclose(c.lam_y, 1 - _boxes(c.lam_x[:1])[0, 4] / (H * W), atol=1e-6)


def test_mix_batch_pastes_the_partner_box_and_mixes_targets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, H, W, 3)).astype(np.float32)
  y = rng.integers(0, 4, 6)
  mb = mixing.mix_batch(jax.random.key(5), x, y, policy=policies.cutmix(1.0, (H, W)),
                        num_classes=4, label_smoothing=0.1)
  m, perm, ly = np.asarray(mb.coeffs.lam_x), np.asarray(mb.perm), np.asarray(mb.coeffs.lam_y)
  np.testing.assert_allclose(mb.inputs, np.where(m == 1, x, x[perm]), atol=1e-6)
  t = np.eye(4)[y] * 0.9 + 0.1 / 4
  np.testing.assert_allclose(mb.targets, ly[:, None] * t + (1 - ly[:, None]) * t[perm], atol=1e-6)


def test_sweeping_alpha_compiles_once():
  traces = []

  def f(pol, key):
    traces.append(1)
    return pol(key, 4)
  g = jax.jit(f)
  g(policies.cutmix(1.0, (H, W), mixup_alpha=0.2), jax.random.key(0))
  g(policies.cutmix(0.3, (H, W), mixup_alpha=0.8), jax.random.key(0))
  assert len(traces) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(H, W, 3)), "image_shape must be"),
    (dict(minmax=(0.5, 0.2)), "minmax must be"),
    (dict(switch_prob=1.5), "switch_prob must be a probability"),
    (dict(apply_prob=-0.1), "apply_prob must be a probability"),
    (dict(mixup_alpha=-1.0), "mixup_alpha must be >= 0"),
    (dict(alpha=0.0), "alpha"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(alpha=1.0, image_shape=(H, W)) | kwargs
  with pytest.raises(ValueError, match=match):
    policies.cutmix(**args)


def test_amp_mixupe_and_hidden_points_are_refused_by_name():
  kw = dict(num_classes=3, image_shape=(H, W), cutmix_alpha=1.0)
  assert isinstance(methods.get_objective("mixup", **kw).policy, policies.CutMix)
  with pytest.raises(ValueError, match="not defined on CutMix"):
    methods.get_objective("mixup+amp", **kw)
  with pytest.raises(ValueError, match="not defined on CutMix"):
    methods.get_objective("mixupe", **kw)
  with pytest.raises(ValueError, match="point"):
    methods.get_objective("mixup", point="stage2", **kw)
  with pytest.raises(ValueError, match="image_shape"):
    methods.get_objective("mixup", num_classes=3, cutmix_alpha=1.0)
  with pytest.raises(ValueError, match="mixup only"):
    methods.get_objective("untied", num_classes=3, image_shape=(H, W), cutmix_alpha=1.0)
  with pytest.raises(ValueError, match="first-order weight"):
    policies.cutmix(1.0, (H, W)).first_order_weight()


# ---- from train.py ----------------------------------------------------------

def test_config_keys_are_validated_and_reach_the_policy():
  import train_testlib as lib
  from mixjax import config_utils, from_config, objectives
  c = lib.tiny_config(steps=2, method="mixup")
  c = config_utils.apply_overrides(c, ["mix.switch_prob=0.5", "mix.apply_prob=0.9",
                                   "mix.cutmix_minmax=(0.2,0.8)", "mix.correct_lam=false",
                                   "mix.cutmix_alpha=0.5"])
  config_utils.validate(c)
  obj = from_config.objective(c, "mixup", None)
  assert isinstance(obj, objectives.Mixup)
  assert obj.policy == policies.cutmix(0.5, (8, 8), True, False, (0.2, 0.8), 1.0, 0.5, 0.9)
  bad = [("mix.switch_prob=1.5", "mix.switch_prob must be a probability"),
         ("mix.cutmix_minmax=(0.8,0.2)", "mix.cutmix_minmax must be"),
         ("mix.bce_threshold=0.2", "needs config.mix.loss='bce'"),
         ("mix.k=1", "mix.k must be an integer >= 2"),
         ("mix.point='stage1'", "config.mix.point=None")]
  for override, match in bad:
    c = lib.tiny_config(steps=2, method="mixup")
    c = config_utils.apply_overrides(c, ["mix.cutmix_alpha=1.0", override])
    with pytest.raises(ValueError, match=match):
      config_utils.validate(c)
  for method, override, match in [("mixup+amp", "mix.cutmix_alpha=1.0", "not defined on CutMix"),
                                  ("untied", "mix.cutmix_alpha=1.0", "mixup only"),
                                  ("mixup+amp", "mix.k=3", "k-way"),
                                  ("mixup", "mix.apply_prob=0.5", "needs CutMix switching")]:
    c = lib.tiny_config(steps=2, method=method)
    c = config_utils.apply_overrides(c, [override])
    with pytest.raises(ValueError, match=match):
      config_utils.validate(c)


def test_amp_called_directly_on_cutmix_is_refused():
  """Not only by name: amp.amp() on a CutMix objective, or on a wrapper of one, says why."""
  from mixjax import amp, objectives
  base = objectives.mixup(policies.cutmix(1.0, (8, 8)), num_classes=3)
  for obj in (base, objectives.Wrapper(base)):
    with pytest.raises(ValueError, match="not defined on a CutMix policy.*hard 0/1 mask"):
      amp.amp(obj)


def test_train_two_steps_with_cutmix_mixup_switching():
  import train
  import train_testlib as lib
  c = lib.tiny_config(steps=2, method="mixup")
  c.mix.cutmix_alpha, c.mix.switch_prob = 1.0, 0.5
  c.mix.loss, c.mix.bce_threshold = "bce", 0.2
  c.schedule.warmup_steps = 1
  (result,) = train.train_and_evaluate(c, None, model=lib.TinyCNN())
  assert result["method"] == "mixup" and result["step"] == 2
  assert np.isfinite(result["train"]["loss"]) and result["train"]["loss"] > 0
