"""mixjax.experiments: the helpers against references, and every --quick run end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from mixjax import hidden
from mixjax import input_pipeline
from mixjax import objectives
from mixjax.experiments import _common as common
from mixjax.experiments import ablations
from mixjax.experiments import corrupted_labels
from mixjax.experiments import gan
from mixjax.experiments import inbetween
from mixjax.experiments import robustness
from mixjax.experiments import tabular
from mixjax.experiments import twomoons

MODULES = [twomoons, robustness, corrupted_labels, gan, inbetween, ablations, tabular]


# ----------------------------------------------------------------------------- helpers


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
  module = common.ResNet(width=4, num_classes=10, conv=False)
  x = np.zeros((2, 8, 8, 1), np.float32)
  paths = hidden.module_paths(module, common.init(module, x, 0), x)
  assert set(common.MIX_POINTS.values()) <= set(paths)
  ids = [c.id for c in ablations.configs()]
  assert len(ids) == len(set(ids)) == len(ablations.PUBLISHED) == 22
  assert set(ablations.QUICK) <= set(ids)
  cfg = next(c for c in ablations.configs() if c.id == "inputs_ac_knn")
  table = np.array([[1, 2], [2, 0], [0, 1]], np.int32)
  _, mixes, batch_fn = ablations.build(cfg, table)
  X, Y = jnp.arange(3.0)[:, None] * 10, jnp.arange(3)
  (xa, xb), (ya, yb) = batch_fn(X, Y, jnp.array([0, 1, 2, 0]), jax.random.key(0))
  assert mixes
  for a, b in zip(np.asarray(ya), np.asarray(yb)):
    assert b in table[a]
  np.testing.assert_array_equal(np.asarray(xb)[:, 0], 10 * np.asarray(yb))
  np.testing.assert_array_equal(ablations.closer_label(jnp.array([0.2, 0.5, 0.9])), [0, 1, 1])


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


def test_gan_nets_start_as_pytorch_linear_layers():
  params = gan.Net(256, 2).init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
  assert [p["kernel"].shape for p in params.values()] == [(2, 256), (256, 256), (256, 256),
                                                           (256, 2)]
  for layer in params.values():
    bound = 1 / np.sqrt(layer["kernel"].shape[0])
    kernel = np.asarray(layer["kernel"]).ravel()
    assert np.abs(kernel).max() <= bound and np.abs(layer["bias"]).max() <= bound
    assert np.abs(layer["bias"]).max() > 0.5 * bound                 # not zeros
    if kernel.size > 1000:                                             # U(-bound, bound)
      assert stats.kstest(kernel, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_gan_mixing_coefficients_of_each_formulation():
  key = jax.random.key(0)
  code = np.asarray(gan.sample_lams(key, "code", 0.2, 20000))
  assert code.min() >= 0 and code.max() < 0.2
  assert stats.kstest(code, stats.uniform(0, 0.2).cdf).pvalue > 1e-3
  paper = np.asarray(gan.sample_lams(key, "paper", 0.2, 20000))
  # Binned, not KS: ~2% of exact Beta(0.2, 0.2) draws lie within float32's spacing of 1
  # and round to 1.0, a tie KS cannot take.
  edges = np.linspace(0, 1, 11)
  counts = np.histogram(paper, edges)[0]
  expected = len(paper) * np.diff(stats.beta(0.2, 0.2).cdf(edges))
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  np.testing.assert_array_equal(gan.sample_lams(key, None, 0.2, 5), np.ones(5))
  with pytest.raises(ValueError, match="Uniform"):
    gan.sample_lams(key, "code", 2.0, 5)
  with pytest.raises(ValueError, match="mixup must be None or one of"):
    gan.make_chunk(8, 4, 1, "wgan")


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


def test_pooled_beta_sampler_and_fit_are_deterministic():
  lam = np.asarray(common.sample_beta(jax.random.key(0), 0.4, 2.0, 5000))
  assert lam.shape == (5000,) and stats.kstest(lam, stats.beta(0.4, 2.0).cdf).pvalue > 1e-3
  with pytest.raises(ValueError, match="alpha"):
    common.sample_beta(jax.random.key(0), 0.0, None, 3)
  x, y, c = common.load_tabular("iris")
  module = common.MLP((8,), c)
  obj = lambda lam: objectives.mixup(common.fixed_policy(lam), num_classes=c)  # noqa: E731
  tx = optax.adam(1e-2)
  runs = [common.fit(module, common.init(module, x, 0), obj, x, y, tx=tx, epochs=4,
                     batch_size=16, seed=3, mix=(1.0, None)) for _ in range(2)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0].variables, runs[1].variables)
  losses = [h["train_loss"] for h in runs[0].history]
  assert losses[-1] < losses[0]
  with pytest.raises(ValueError, match="batch_size"):
    common.fit(module, common.init(module, x, 0), obj, x, y, tx=tx, epochs=1, batch_size=1000,
               seed=0)


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
  r = twomoons.main(["--quick", "--out", out])
  _check_files(r, out, "twomoons")
  assert len(r["figures"]) == 2
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
  r = gan.main(["--quick", "--out", out, "--formulations", "code,paper"])
  _check_files(r, out, "gan")
  assert list(r["methods"].values()) == [None, "code", "paper"]
  assert len(r["runs"]) == 6
  for samples in r["runs"].values():
    assert sorted(samples) == r["snapshots"]
    assert all(s.shape == (2000, 2) and np.all(np.isfinite(s)) for s in samples.values())


def test_inbetween_quick(tmp_path):
  out = str(tmp_path)
  r = inbetween.main(["--quick", "--out", out])
  _check_files(r, out, "inbetween")
  for miss, norm in r["stats"].values():
    assert np.all((miss >= 0) & (miss <= 1)) and np.all(norm > 0)


def test_ablations_quick(tmp_path):
  out = str(tmp_path)
  r = ablations.main(["--quick", "--out", out])
  _check_files(r, out, "ablations")
  in_order = [c.id for c in ablations.configs() if c.id in ablations.QUICK]
  assert [c.id for c in r["configs"]] == in_order
  assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in r["medians"].values())


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
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import train
  from mixjax import config_utils
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
