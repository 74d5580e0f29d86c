"""mixjax.experiments: the helpers against references, and every --quick run end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import train
from mixjax import attacks
from mixjax import config_utils
from mixjax import input_pipeline
from mixjax import methods
from mixjax import mixupe
from mixjax import models
from mixjax import objectives
from mixjax import policies
from mixjax.experiments import ablations
from mixjax.experiments import common
from mixjax.experiments import corrupted_labels
from mixjax.experiments import data
from mixjax.experiments import gan
from mixjax.experiments import inbetween
from mixjax.experiments import robustness
from mixjax.experiments import tabular
from mixjax.experiments import training
from mixjax.experiments import twomoons

MODULES = [twomoons, robustness, corrupted_labels, gan, inbetween, ablations, tabular]


# ----------------------------------------------------------------------------- helpers


def fixed_policy(lam):
  """A policy that returns the given coefficients f32[B] (for inputs and labels)."""
  return lambda key, batch_size: policies.Coefficients(lam, lam)


def test_corrupt_labels_matches_the_input_pipeline_and_marks_the_replaced():
  y = np.random.default_rng(0).integers(0, 10, 1000).astype(np.int32)
  new, mask = corrupted_labels.corrupt_labels(y, 0.3, 10, seed=5)
  np.testing.assert_array_equal(new, input_pipeline.corrupt_labels(y, 0.3, 10, seed=5))
  assert mask.sum() == 300 and mask.dtype == bool
  np.testing.assert_array_equal(new[~mask], y[~mask])
  assert 0.8 < np.mean(new[mask] != y[mask]) < 0.98      # ~9/10 change (uniform redraw)
  again, mask2 = corrupted_labels.corrupt_labels(y, 0.3, 10, seed=5)
  np.testing.assert_array_equal(again, new)
  np.testing.assert_array_equal(mask2, mask)
  assert not np.array_equal(corrupted_labels.corrupt_labels(y, 0.3, 10, seed=6)[1], mask)
  with pytest.raises(ValueError, match="fraction"):
    corrupted_labels.corrupt_labels(y, 1.5, 10, 0)
  with pytest.raises(ValueError, match="labels"):
    corrupted_labels.corrupt_labels(y.astype(float), 0.5, 10, 0)


@pytest.mark.parametrize("same_class", [False, True])
def test_nearest_neighbours_brute_force(same_class):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 2, 3)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  nn_idx = ablations.nearest_neighbours(x, y, 5, same_class)
  flat = x.reshape(40, -1)
  for i in range(40):
    cand = [j for j in range(40) if j != i and (not same_class or y[j] == y[i])]
    d = np.linalg.norm(flat[cand] - flat[i], axis=1)
    want = np.asarray(cand)[np.argsort(d, kind="stable")[:5]]
    np.testing.assert_array_equal(np.sort(nn_idx[i]), np.sort(want))
    assert i not in nn_idx[i]


def test_ablation_layers_are_the_models_mixing_points_and_knn_partners_come_from_the_table():
  # (test_models checks that every mixing point is a submodule the model calls, in order.)
  model = models.get_model("preact_resnet_small", width=4, conv=False)
  assert list(ablations.MIX_POINTS.values()) == list(model.mixing_points[1:-1])
  layers = {c.point for c in ablations.configs() if c.id.startswith("layer")}
  assert layers == set(ablations.MIX_POINTS.values())
  ids = [c.id for c in ablations.configs()]
  assert len(ids) == len(set(ids)) == 24 and len(ablations.PUBLISHED) == 22
  assert set(ablations.PUBLISHED) <= set(ids)
  assert set(ablations.QUICK) <= set(ids)
  cfg = next(c for c in ablations.configs() if c.id == "inputs_ac_knn")
  table = np.array([[1, 2], [2, 0], [0, 1]], np.int32)
  lam = jnp.array([0.2, 0.5, 0.9, 0.4])
  objective, fetch = ablations.build(cfg, fixed_policy(lam))
  X, Y = jnp.arange(3.0)[:, None] * 10, jnp.arange(3)
  (xa, xb), (ya, yb) = fetch((X, Y, table), jnp.array([0, 1, 2, 0]), jax.random.key(0))
  assert isinstance(objective, training.PartnerMixup)      # mixes, with the closer label
  coeffs = objective.policy(jax.random.key(1), 4)
  np.testing.assert_array_equal(coeffs.lam_x, lam)
  np.testing.assert_array_equal(coeffs.lam_y, [0, 1, 1, 0])
  for a, b in zip(np.asarray(ya), np.asarray(yb)):
    assert b in table[a]
  np.testing.assert_array_equal(np.asarray(xb)[:, 0], 10 * np.asarray(yb))
  np.testing.assert_array_equal(ablations.closer_label(jnp.array([0.2, 0.5, 0.9])), [0, 1, 1])


def test_partner_mixup_is_mixup_with_given_partners():
  """Against the loss by hand; with lam = 1 (the erm policy) it is ERM on x_a."""
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  xa, xb = (jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for _ in range(2))
  ya, yb = jnp.asarray(rng.integers(0, 3, 6)), jnp.asarray(rng.integers(0, 3, 6))
  apply = lambda v, x, key=None, mix=None: (x @ v["params"]["w"], {})  # noqa: E731
  variables = {"params": {"w": w}}
  key = jax.random.key(0)
  lam = jnp.asarray(rng.uniform(size=6), jnp.float32)
  obj = training.PartnerMixup(fixed_policy(lam), num_classes=3)
  loss, (state, metrics) = obj(apply, variables, (xa, xb), (ya, yb), key)
  z = np.asarray((lam[:, None] * xa + (1 - lam[:, None]) * xb) @ w)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  idx = np.arange(6)
  want = -np.mean(lam * logp[idx, ya] + (1 - lam) * logp[idx, yb])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert state == {} and metrics["loss"] == loss
  erm_loss, _ = training.PartnerMixup(policies.erm(), num_classes=3)(
      apply, variables, (xa, xb), (ya, yb), key)
  want_erm, _ = methods.get_objective("erm", num_classes=3)(apply, variables, xa, ya, key)
  np.testing.assert_allclose(erm_loss, want_erm, rtol=1e-6)


def test_gan_data_and_mode_statistics():
  ring, grid = gan.centers("8gaussians"), gan.centers("25gaussians")
  np.testing.assert_allclose(np.linalg.norm(ring, axis=1), 1.0, rtol=1e-6)
  assert grid.shape == (25, 2) and len({tuple(c) for c in grid}) == 25
  np.testing.assert_allclose(np.unique(grid), [-1, -0.5, 0, 0.5, 1])
  real = np.asarray(gan.sample_data(jax.random.key(0), jnp.asarray(grid), 4000))
  covered, share = gan.mode_stats(real, grid)
  assert covered == 25 and share > 0.98
  collapsed = np.tile(ring[:1], (500, 1))
  assert gan.mode_stats(collapsed, ring) == (1, 1.0)
  with pytest.raises(ValueError, match="dataset"):
    gan.centers("swissroll")


@pytest.mark.parametrize("which", [0, 1])
def test_gan_nets_start_as_pytorch_linear_layers(which):
  net = gan.networks(256)[which]
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
  layers = [params[f"stage{i}"]["dense"] for i in (1, 2, 3)] + [params["out" if which == 0
                                                                       else "head"]]
  assert [p["kernel"].shape for p in layers] == [(2, 256), (256, 256), (256, 256),
                                                 (256, 2 - which)]
  for layer in layers:
    bound = 1 / np.sqrt(layer["kernel"].shape[0])
    kernel = np.asarray(layer["kernel"]).ravel()
    assert np.abs(kernel).max() <= bound and np.abs(layer["bias"]).max() <= bound
    assert layer["bias"].size < 8 or np.abs(layer["bias"]).max() > 0.5 * bound  # not zeros
    if kernel.size > 1000:                                             # U(-bound, bound)
      assert stats.kstest(kernel, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_gan_mixing_coefficients_of_each_formulation():
  key = jax.random.key(0)
  def draw(mixup, alpha, n):
    return common.jit(gan.mixing_policy(mixup, alpha), fast=True, static_argnums=1)(key, n)

  code = np.asarray(draw("code", 0.2, 20000).lam_x)
  np.testing.assert_array_equal(draw("code", 0.2, 5).lam_y, draw("code", 0.2, 5).lam_x)
  assert code.min() >= 0 and code.max() < 0.2
  assert stats.kstest(code, stats.uniform(0, 0.2).cdf).pvalue > 1e-3
  paper = np.asarray(draw("paper", 0.2, 20000).lam_x)
  # Binned, not KS: ~2% of exact Beta(0.2, 0.2) draws lie within float32's spacing of 1
  # and round to 1.0, a tie KS cannot take.
  edges = np.linspace(0, 1, 11)
  counts = np.histogram(paper, edges)[0]
  expected = len(paper) * np.diff(stats.beta(0.2, 0.2).cdf(edges))
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  np.testing.assert_array_equal(draw(None, 0.2, 5).lam_x, np.ones(5))
  with pytest.raises(ValueError, match="Uniform"):
    gan.mixing_policy("code", 2.0)
  with pytest.raises(ValueError, match="mixup must be None or one of"):
    gan.train("8gaussians", "wgan", alpha=0.2, hidden=8, snapshots=[10], seed=0)


def test_gan_discriminator_batches():
  key, modes = jax.random.key(0), jnp.asarray(gan.centers("25gaussians"))
  fakes = jnp.full((8, 2), 5.0)                              # far from every mode
  batch = common.jit(gan.discriminator_batch, fast=True, static_argnums=4)
  (xa, xb), (ta, tb) = batch(key, fakes, modes, jnp.int32(25), None)
  assert xa.shape == (16, 2)                                 # ERM: a pool, its own partner
  np.testing.assert_array_equal(xa, xb)
  np.testing.assert_array_equal(ta, tb)
  np.testing.assert_array_equal(np.asarray(ta)[:, 0], np.all(np.asarray(xa) != 5.0, -1))
  (xa, xb), (ta, tb) = batch(key, fakes, modes, jnp.int32(25), "code")
  assert xa.shape == xb.shape == (8, 2) and not np.array_equal(xa, xb)   # two pools of 4 + 4
  for x, t in ((xa, ta), (xb, tb)):
    assert np.asarray(t).sum() == 4
    np.testing.assert_array_equal(np.asarray(t)[:, 0], np.all(np.asarray(x) != 5.0, -1))
  (xa, xb), (ta, tb) = batch(key, fakes, modes, jnp.int32(25), "paper")
  assert xa.shape == xb.shape == (8, 2) and np.all(np.asarray(xb) == 5.0)  # real, fake
  assert np.all(np.asarray(xa) != 5.0) and np.all(ta == 1) and np.all(tb == 0)
  # code+real_fake: every pair one real and one fake, in either order; labels follow.
  fakes = jnp.full((64, 2), 5.0)
  (xa, xb), (ta, tb) = batch(key, fakes, modes, jnp.int32(25), "code+real_fake")
  fa, fb = np.all(np.asarray(xa) == 5.0, -1), np.all(np.asarray(xb) == 5.0, -1)
  assert xa.shape == (64, 2) and np.all(fa != fb) and 0 < fa.sum() < 64
  np.testing.assert_array_equal(np.asarray(ta)[:, 0], ~fa)
  np.testing.assert_array_equal(np.asarray(tb)[:, 0], ~fb)
  for name in ("code+beta", "code+mixed_g"):                 # two pools of 32 + 32
    (xa, xb), (ta, tb) = batch(key, fakes, modes, jnp.int32(25), name)
    assert xa.shape == (64, 2) and np.asarray(ta).sum() == np.asarray(tb).sum() == 32


def test_gan_single_change_formulations():
  # Each variant is the script's formulation with exactly one of the paper's three changes.
  code, paper = gan.FORMULATIONS["code"], gan.FORMULATIONS["paper"]
  fields = ("lam", "pairing", "mixed_g")
  assert all(getattr(code, f) != getattr(paper, f) for f in fields)
  for name, changed in (("code+beta", "lam"), ("code+real_fake", "pairing"),
                        ("code+mixed_g", "mixed_g")):
    f = gan.FORMULATIONS[name]
    assert [k for k in fields if getattr(f, k) != getattr(code, k)] == [changed]
  assert gan.FORMULATIONS["code+beta"].lam == paper.lam
  assert gan.FORMULATIONS["code+mixed_g"].mixed_g == paper.mixed_g
  key = jax.random.key(0)
  beta = np.asarray(common.jit(gan.mixing_policy("code+beta", 0.2), fast=True,
                               static_argnums=1)(key, 20000).lam_x)
  edges = np.linspace(0, 1, 11)
  expected = len(beta) * np.diff(stats.beta(0.2, 0.2).cdf(edges))
  assert stats.chisquare(np.histogram(beta, edges)[0], expected).pvalue > 1e-3
  for name in ("code+real_fake", "code+mixed_g"):
    lam = np.asarray(common.jit(gan.mixing_policy(name, 0.2), fast=True,
                                static_argnums=1)(key, 1000).lam_x)
    assert lam.max() < 0.2
  assert [gan.num_fakes(f, 128) for f in (None, "code", "paper", "code+real_fake")] == [
      128, 256, 128, 256]


def test_inbetween_stats_of_a_linear_model_by_hand():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y = rng.integers(0, 3, 30).astype(np.int32)
  pairs = rng.integers(0, 30, size=(50, 2))
  lams = np.array([0.0, 0.3, 1.0])
  miss, norm = inbetween.inbetween_stats(lambda v: v @ w, x, y, pairs, lams, 3, batch_size=16)
  for k, lam in enumerate(lams):
    xm = lam * x[pairs[:, 0]] + (1 - lam) * x[pairs[:, 1]]
    z = xm @ w
    pred = z.argmax(-1)
    want_miss = np.mean((pred != y[pairs[:, 0]]) & (pred != y[pairs[:, 1]]))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    t = lam * np.eye(3)[y[pairs[:, 0]]] + (1 - lam) * np.eye(3)[y[pairs[:, 1]]]
    want_norm = np.linalg.norm((p - t) @ w.T, axis=-1).mean()
    np.testing.assert_allclose(miss[k], want_miss)
    np.testing.assert_allclose(norm[k], want_norm, rtol=1e-5)


def test_fit_is_deterministic_lowers_the_loss_and_reports_the_test_error():
  x, y, c = data.load_tabular("iris")
  model = models.get_model("mlp", num_classes=c, hidden_sizes=(8,))
  obj = methods.get_objective("mixup", num_classes=c, alpha=1.0)
  tx = optax.adam(1e-2)
  runs = [training.fit(model, obj, x, y, tx=tx, epochs=4, batch_size=16, seed=3,
                       test=(x[:50], y[:50]), num_classes=c, fast=True) for _ in range(2)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0].variables, runs[1].variables)
  losses = [h["train_loss"] for h in runs[0].history]
  assert losses[-1] < losses[0]
  logits = training.predict(model, runs[0].variables, x[:50], fast=True)
  assert runs[0].history[-1]["test_error"] == pytest.approx(
      training.error_rate(logits, y[:50]), abs=1e-6)
  with pytest.raises(ValueError, match="batch_size"):
    training.fit(model, obj, x, y, tx=tx, epochs=1, batch_size=1000, seed=0)


# ----------------------------------------------------------------------------- --quick runs


def _read(out, name):
  with open(os.path.join(out, f"{name}.md")) as f:
    return f.read()


def _check_files(result, out, name):
  assert os.path.isfile(result["report"]) and result["report"] == os.path.join(out, f"{name}.md")
  for fig in result["figures"]:
    with open(fig, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.basename(fig) in _read(out, name)   # linked from the report
  assert "|---|" in _read(out, name)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_help(module, capsys):
  with pytest.raises(SystemExit) as e:
    module.main(["--help"])
  assert e.value.code == 0
  assert "--quick" in capsys.readouterr().out


def test_twomoons_quick(tmp_path):
  out = str(tmp_path)
  r = twomoons.main(["--quick", "--out", out, "--seeds", "2"])
  _check_files(r, out, "twomoons")
  assert len(r["figures"]) == 3 and r["seeds"] == [0, 1]
  assert "over 2 seeds" in _read(out, "twomoons")
  for errs in r["scale_errors"]["Logistic regression"]:
    # Lemma 3.1's expansion at lam = 1 gets worse as the logits grow; the expansion
    # around the mean mixed input is closer at every scale tried here.
    assert np.all(np.diff(errs["lam1"]) > 0)
    assert np.all(errs["mean"] < errs["lam1"])
  log = r["records"]["Logistic regression"]
  assert np.all(np.isfinite(log["mix_train"])) and np.all(np.isfinite(log["approx_train"]))
  assert log["mix_train"][-1] < log["mix_train"][0]      # training lowers the mixup loss
  assert r["gaps"]["Logistic regression", "train"] < 0.05
  assert np.all((log["cos_min"] >= 0) & (log["cos_min"] <= 1))


def test_robustness_quick(tmp_path):
  out = str(tmp_path)
  r = robustness.main(["--quick", "--out", out])
  _check_files(r, out, "robustness")
  text = _read(out, "robustness")
  assert "(a) White box attacks." in text and "(b) Black box attacks." in text
  for label in ("FGSM", "I-FGSM"):
    for name, res in r["white"][label].items():
      assert res.top1 >= res.clean_top1 and 0 <= res.top5 <= res.top1 <= 1
    assert set(r["black"][label]) == {"ERM (2nd)", "mixup"}
  for name, curve in r["curves"].items():                # eps = 0 is the clean error
    assert curve[0] == pytest.approx(r["white"]["FGSM"][name].clean_top1)


def test_corrupted_labels_quick(tmp_path):
  out = str(tmp_path)
  r = corrupted_labels.main(["--quick", "--out", out])
  _check_files(r, out, "corrupted_labels")
  assert len(r["results"]) == len(corrupted_labels.SETTINGS[0.5])
  for res in r["results"].values():
    assert 0 <= res["best"] <= res["last"] <= 1
    assert 0 <= res["train_real"] <= 1 and 0 <= res["train_corrupted"] <= 1
  assert "18.8 / 44.6 / 0.26 / 0.64" in _read(out, "corrupted_labels")


def test_gan_quick(tmp_path):
  out = str(tmp_path)
  r = gan.main(["--quick", "--out", out, "--formulations", "code+mixed_g,paper",
                "--datasets", "8gaussians", "--seeds", "2"])
  _check_files(r, out, "gan")
  assert list(r["methods"].values()) == [None, "code+mixed_g", "paper"]
  assert len(r["runs"]) == 6 and r["seeds"] == [0, 1]
  for samples in r["runs"].values():
    assert sorted(samples) == r["snapshots"]
    assert all(s.shape == (2000, 2) and np.all(np.isfinite(s)) for s in samples.values())
  for (d, m), st in r["stats"].items():                   # [seeds, snapshots, 2]
    assert st.shape == (2, len(r["snapshots"]), 2)
    for seed_index, seed in enumerate(r["seeds"]):
      expected = [gan.mode_stats(r["runs"][d, m, seed][s], gan.centers(d)) for s in r["snapshots"]]
      np.testing.assert_allclose(st[seed_index], expected)
  assert "± " in _read(out, "gan") and "over 2 seeds" in _read(out, "gan")


def test_inbetween_quick(tmp_path):
  out = str(tmp_path)
  r = inbetween.main(["--quick", "--out", out, "--seeds", "2", "--pairs", "100"])
  _check_files(r, out, "inbetween")
  for name, (miss, norm) in r["stats"].items():
    assert np.all((miss >= 0) & (miss <= 1)) and np.all(norm > 0)
    runs = r["per_seed"][name]
    assert len(runs) == 2 and not np.array_equal(runs[0][0], runs[1][0])  # own split / init
    np.testing.assert_allclose(miss, (runs[0][0] + runs[1][0]) / 2)
  assert "over 2 seed(s)" in _read(out, "inbetween")


def test_robustness_table_over_seeds():
  res = lambda top1, clean: attacks.Result(top1, top1 / 2, clean)  # noqa: E731
  per_seed = [{"white": {"FGSM": {"ERM": res(0.5, 0.1)}, "I-FGSM": {"ERM": res(0.9, 0.1)}},
               "black": {"FGSM": {"mixup": res(0.2, 0.1)}, "I-FGSM": {"mixup": res(0.3, 0.1)}}},
              {"white": {"FGSM": {"ERM": res(0.7, 0.1)}, "I-FGSM": {"ERM": res(1.0, 0.1)}},
               "black": {"FGSM": {"mixup": res(0.4, 0.1)}, "I-FGSM": {"mixup": res(0.3, 0.1)}}}]
  text = robustness.table3_over_seeds(per_seed)
  assert "| Top-1 | ERM | 60.0 ± 10.0 | 95.0 ± 5.0 |" in text
  assert "| Top-5 | ERM | 30.0 ± 5.0 | 47.5 ± 2.5 |" in text
  assert "| Top-1 | mixup | 30.0 ± 10.0 | 30.0 ± 0.0 |" in text
  assert "(b) Black box attacks." in text


def test_ablations_quick(tmp_path):
  out = str(tmp_path)
  r = ablations.main(["--quick", "--out", out])
  _check_files(r, out, "ablations")
  in_order = [c.id for c in ablations.configs() if c.id in ablations.QUICK]
  assert [c.id for c in r["configs"]] == in_order
  assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in r["medians"].values())


def test_ablations_run_mixupe_on_erm_and_on_mixup(tmp_path):
  """The MixupE paper's Table 7 rows: its term added to ERM and to mixup."""
  r = ablations.main(["--quick", "--out", str(tmp_path), "--configs", "erm_mixupe,mixupe",
                      "--epochs", "1"])
  assert [c.id for c in r["configs"]] == ["erm_mixupe", "mixupe"]
  assert all(0 <= v[0] <= 1 for v in r["medians"].values())
  erm_row = next(c for c in ablations.configs() if c.id == "erm_mixupe")
  objective, _ = ablations.build(erm_row, policies.mixup(1.0))
  assert isinstance(objective, mixupe.MixupE) and isinstance(objective.base, objectives.Erm)


def test_ablations_seeds_draw_their_own_split_and_are_averaged(tmp_path):
  out = str(tmp_path)
  r = ablations.main(["--quick", "--out", out, "--configs", "erm", "--seeds", "2",
                      "--epochs", "2", "--seed", "3"])
  assert r["seeds"] == [3, 4]
  (runs,) = r["results"].values()
  assert len(runs) == 2 and not np.array_equal(runs[0]["errors"], runs[1]["errors"])
  (medians,) = r["medians"].values()
  text = _read(out, "ablations")
  assert f"{100 * np.mean(medians):.2f} ± {100 * np.std(medians):.2f}" in text


def test_tabular_quick(tmp_path):
  out = str(tmp_path)
  r = tabular.main(["--quick", "--out", out])
  _check_files(r, out, "tabular")
  assert r["methods"][:2] == ["erm", "mixup"]
  for errs in r["errors"].values():
    assert len(errs) == 2 and all(0 <= e <= 1 for e in errs)
  text = _read(out, "tabular")
  assert "21.3" in text and "17.3" in text                # the published Iris row


def test_robustness_evaluates_train_py_checkpoints(tmp_path):
  c = config_utils.base_config()
  c.method = "erm"
  c.model.name = "mlp"
  c.model.kwargs = {"hidden_sizes": (16,)}
  c.dataset.name, c.dataset.num_classes, c.dataset.input_shape = "digits", 10, (8, 8, 1)
  c.batch_size, c.eval_batch_size, c.total_steps = 16, 64, 3
  c.checkpoint_every_steps, c.log_every_steps, c.mesh_data, c.progress_bar = 3, 1, 1, False
  config_utils.validate(c)
  workdir = str(tmp_path / "run")
  result = train.train_one(c, "erm", workdir)
  fn, config = robustness.load_run(workdir)
  assert config.model.name == "mlp"
  data = input_pipeline.load_arrays(config.dataset, seed=config.seed)["eval"]
  x, y = data.get(np.arange(len(data)))
  accuracy = np.mean(np.argmax(np.asarray(fn(jnp.asarray(x))), -1) == y)
  assert accuracy == pytest.approx(result["eval"]["top1"], abs=1e-6)
  out = str(tmp_path / "out")
  r = robustness.main(["--checkpoint", f"A={workdir}", "--checkpoint", f"B={workdir}",
                       "--max_examples", "32", "--out", out])
  assert set(r["white"]["FGSM"]) == {"A", "B"} and set(r["black"]["FGSM"]) == {"B"}
  # The same weights: the transfer attack from A is B's white-box attack.
  assert r["black"]["I-FGSM"]["B"] == r["white"]["I-FGSM"]["B"]
  with pytest.raises(ValueError, match="NAME=WORKDIR"):
    robustness.main(["--checkpoint", workdir, "--out", out])
