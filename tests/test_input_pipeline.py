"""Tests of mixjax.input_pipeline (NumPy path; TFDS needs the optional extra)."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from mixjax import config_utils
from mixjax import input_pipeline as ip
from mixjax.input_pipeline import augment, text


def _dcfg(**kw):
  c = config_utils.base_config().dataset
  for k, v in kw.items():
    c[k] = v
  return c


def test_digits_fixed_split_normalised():
  d = ip.load_arrays(_dcfg(name="digits"))
  tr, te = d["train"], d["eval"]
  assert tr.inputs.shape == (1438, 8, 8, 1) and te.inputs.shape == (359, 8, 8, 1)
  assert tr.inputs.dtype == np.float32 and tr.labels.dtype == np.int32
  assert abs(tr.inputs.mean()) < 1e-5 and abs(tr.inputs.std() - 1) < 1e-4
  assert np.bincount(te.labels).min() >= 34  # stratified: ~36 per class
  again = ip.load_arrays(_dcfg(name="digits"))
  np.testing.assert_array_equal(again["eval"].labels, te.labels)
  # No test image is in the training set.
  train_rows = {r.tobytes() for r in tr.inputs}
  assert sum(r.tobytes() in train_rows for r in te.inputs) <= 2  # digits has a few duplicates


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
  ds = ip.ArrayDataset(np.arange(40, dtype=np.float32)[:, None], np.arange(40, dtype=np.int32), 40)
  it = ip.TrainIterator(ds, 8, seed=3, prefetch=2)
  seen = [next(it)["labels"] for _ in range(10)]
  it.close()
  # One epoch = 5 batches, a permutation of the 40 examples; the next epoch is reshuffled.
  assert sorted(np.concatenate(seen[:5])) == list(range(40))
  assert sorted(np.concatenate(seen[5:])) == list(range(40))
  assert not np.array_equal(np.concatenate(seen[:5]), np.concatenate(seen[5:]))
  # Resuming at step 7 gives the same batches as the uninterrupted stream.
  resumed = ip.TrainIterator(ds, 8, seed=3, start_step=7, prefetch=0)
  np.testing.assert_array_equal(next(resumed)["labels"], seen[7])
  other = ip.TrainIterator(ds, 8, seed=4, prefetch=0)
  assert not np.array_equal(next(other)["labels"], seen[0])


def test_process_slices_concatenate_to_the_global_batch():
  ds = ip.SyntheticDataset(64, (6, 6, 3), 5, seed=1)
  full = ip.TrainIterator(ds, 16, seed=0, augment="cifar", prefetch=0).batch_at(3)
  parts = [ip.TrainIterator(ds, 16, seed=0, augment="cifar", process_index=p, process_count=4,
                            prefetch=0).batch_at(3) for p in range(4)]
  for key in ("inputs", "labels"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  assert parts[0]["inputs"].shape == (4, 6, 6, 3)


def test_epoch_pairing_lays_out_two_shuffled_copies_for_reverse_pairing():
  n, b, groups = 24, 8, 2
  ds = ip.ArrayDataset(np.zeros((n, 1), np.float32), np.arange(n, dtype=np.int32), n)
  it = ip.TrainIterator(ds, b, seed=0, epoch_pairing=True, num_groups=groups, prefetch=0)
  firsts, seconds = [], []
  for step in range(n // (b // 2)):  # one pass over the N pairs
    idx = it.global_indices(step).reshape(groups, b // groups)
    m = b // groups // 2
    firsts.append(idx[:, :m].ravel())
    seconds.append(idx[:, ::-1][:, :m].ravel())  # reverse pairing inside each group
  a, bb = np.concatenate(firsts), np.concatenate(seconds)
  assert sorted(a) == list(range(n)) and sorted(bb) == list(range(n))  # each copy: a permutation
  assert not np.array_equal(a, bb)  # shuffled independently
  # Three steps fit in one data epoch (N / B); the pair stream continues across them.
  assert it.steps_per_epoch == n // (b // 2)
  with pytest.raises(ValueError, match="divisible"):
    ip.TrainIterator(ds, 6, seed=0, epoch_pairing=True, num_groups=2)


def test_label_corruption_fraction_and_determinism():
  labels = np.arange(1000, dtype=np.int32) % 10
  out = ip.corrupt_labels(labels, 0.5, 10, seed=1)
  changed = np.mean(out != labels)
  # 500 replaced by uniform labels; 10% of those keep their label by chance.
  assert 0.40 <= changed <= 0.50
  np.testing.assert_array_equal(out, ip.corrupt_labels(labels, 0.5, 10, seed=1))
  assert not np.array_equal(out, ip.corrupt_labels(labels, 0.5, 10, seed=2))
  np.testing.assert_array_equal(ip.corrupt_labels(labels, 0.0, 10, seed=1), labels)
  with pytest.raises(ValueError, match="label_corruption"):
    ip.corrupt_labels(labels, 1.5, 10, seed=1)
  d = ip.load_arrays(_dcfg(name="digits", label_corruption=0.2))
  clean = ip.load_arrays(_dcfg(name="digits"))
  assert 0.14 <= np.mean(d["train"].labels != clean["train"].labels) <= 0.2
  np.testing.assert_array_equal(d["eval"].labels, clean["eval"].labels)  # test set untouched


def test_cifar_augmentation_matches_naive_pad_crop_flip():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 8, 8, 2)).astype(np.float32)
  out = ip.augment_batch(x, "cifar", np.random.default_rng(7), (8, 8, 2))
  r = np.random.default_rng(7)
  dy, dx = r.integers(0, 9, (2, 5))
  flip = r.uniform(size=5) < 0.5
  for i in range(5):
    p = np.pad(x[i], ((4, 4), (4, 4), (0, 0)))
    want = p[dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
    if flip[i]:
      want = want[:, ::-1]
    np.testing.assert_array_equal(out[i], want)


def test_inception_crop_boxes_and_bilinear_resize():
  rng = np.random.default_rng(0)
  top, left, h, w = ip.inception_boxes(rng, 4000, 64, 48)
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 64) & (left + w <= 48) & (h > 0) & (w > 0))
  area = h * w / (64 * 48)
  assert area.min() >= 0.07 and area.max() <= 1.0
  ratio = w / h
  valid = area < 0.99  # fall-back boxes are the full image
  assert ratio[valid].min() > 0.7 and ratio[valid].max() < 1.45
  # Bilinear resize: an identity box reproduces the image; a linear ramp stays linear.
  x = rng.normal(size=(2, 10, 12, 3)).astype(np.float32)
  full = lambda v: np.full(2, v)  # noqa: E731
  same = augment._bilinear_crops(x, full(0), full(0), full(10), full(12), 10, 12)
  np.testing.assert_allclose(same, x, atol=1e-6)
  ramp = np.broadcast_to(np.arange(12, dtype=np.float32)[None, None, :, None], (1, 10, 12, 1))
  half = augment._bilinear_crops(np.ascontiguousarray(ramp), np.zeros(1, int), np.zeros(1, int),
                                 np.full(1, 10), np.full(1, 12), 5, 6)
  np.testing.assert_allclose(half[0, 0, :, 0], [0.5, 2.5, 4.5, 6.5, 8.5, 10.5], atol=1e-5)
  aug = ip.augment_batch(x, "inception", rng, (7, 7, 3))
  assert aug.shape == (2, 7, 7, 3) and aug.dtype == np.float32
  ev = ip.eval_transform(x, "inception", (8, 8, 3))
  assert ev.shape == (2, 8, 8, 3) and ev.dtype == np.float32
  # uint8 images: the float resize rounded to the nearest grey level, still uint8.
  u = rng.integers(0, 256, (2, 10, 12, 3), dtype=np.uint8)
  for out, ref in ((ip.augment_batch(u, "inception", np.random.default_rng(1), (7, 7, 3)),
                    ip.augment_batch(u.astype(np.float32), "inception", np.random.default_rng(1),
                                     (7, 7, 3))),
                   (ip.eval_transform(u, "inception", (8, 8, 3)),
                    ip.eval_transform(u.astype(np.float32), "inception", (8, 8, 3)))):
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(ref).astype(np.uint8))


def test_eval_batches_pad_with_mask_and_cover_every_example_once():
  ds = ip.ArrayDataset(np.arange(10, dtype=np.float32)[:, None], np.arange(10, dtype=np.int32), 10)
  batches = list(ip.eval_batches(ds, 4))
  assert len(batches) == 3
  labels = np.concatenate([b["labels"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(10))
  assert batches[-1]["mask"].tolist() == [1, 1, 0, 0]
  per_process = [list(ip.eval_batches(ds, 4, process_index=p, process_count=2)) for p in range(2)]
  assert all(len(b) == 3 for b in per_process)
  np.testing.assert_array_equal(np.concatenate([per_process[0][0]["labels"],
                                                per_process[1][0]["labels"]]), [0, 1, 2, 3])


def test_synthetic_dataset_is_deterministic_and_learnable():
  ds = ip.SyntheticDataset(100, (4, 4, 3), 5, seed=0)
  x, y = ds.get(np.arange(100))
  x2, y2 = ip.SyntheticDataset(100, (4, 4, 3), 5, seed=0).get(np.arange(100))
  np.testing.assert_array_equal(x, x2)
  # The class is linearly decodable from the mean intensity.
  means = x.reshape(100, -1).mean(axis=1)
  pred = np.round((means + 1) / 2 * 4)
  assert np.mean(pred == y) > 0.9
  tok = ip.SyntheticDataset(10, (7,), 3, input_dtype="int32", vocab_size=50)
  t, ty = tok.get(np.arange(10))
  assert t.dtype == np.int32 and t.min() >= 2 and t.max() < 50
  np.testing.assert_array_equal(t[:, 0], 2 + ty)


def test_tsv_and_npz_local_formats(tmp_path):
  (tmp_path / "train.tsv").write_text("DESC\tWhat is a cat ?\nNUM\tHow many legs ?\nDESC\tWhat is it ?\n")
  (tmp_path / "test.tsv").write_text("NUM\thow many cats ?\n")
  d = ip.load_arrays(_dcfg(name="tsv", data_dir=str(tmp_path), input_shape=(5,),
                           input_dtype="int32", num_classes=2, vocab_size=100))
  tr, te = d["train"], d["eval"]
  assert tr.inputs.shape == (3, 5) and tr.inputs.dtype == np.int32
  assert tr.labels.tolist() == [0, 1, 0]  # sorted label names: DESC, NUM
  vocab = ip.build_vocab(["What is a cat ?", "How many legs ?", "What is it ?"], 100)
  np.testing.assert_array_equal(te.inputs[0], ip.encode(["how many cats ?"], vocab, 5)[0])
  assert te.inputs[0, 2] == 1  # 'cats' is unknown
  (tmp_path / "bad.tsv").write_text("no tab here\n")
  with pytest.raises(ValueError, match="label<TAB>text"):
    ip.load_arrays(_dcfg(name="tsv", data_dir=str(tmp_path), train_split="bad",
                         input_shape=(5,), input_dtype="int32"))
  np.savez(tmp_path / "train.npz", x=np.ones((6, 3)), y=np.arange(6) % 2)
  np.savez(tmp_path / "test.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
  d = ip.load_arrays(_dcfg(name="npz", data_dir=str(tmp_path), input_shape=(3,), num_classes=2))
  assert d["train"].inputs.shape == (6, 3) and d["eval"].labels.tolist() == [0, 1]
  with pytest.raises(ValueError, match="missing"):
    ip.load_arrays(_dcfg(name="npz", data_dir=str(tmp_path / "nope")))


def test_npz_uint8_images_are_normalised_on_the_0_1_scale(tmp_path):
  """A named mean/std is for images in [0, 1]: uint8 npz images are scaled by 1/255 first."""
  raw = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  for split in ("train", "test"):
    np.savez(tmp_path / f"{split}.npz", x=raw, y=np.arange(6) % 2)
  d = ip.load_arrays(_dcfg(name="npz", data_dir=str(tmp_path), input_shape=(4, 4, 3),
                           num_classes=2, normalize="cifar10"))
  assert d["train"].inputs.dtype == np.uint8
  it = ip.TrainIterator(d["train"], 6, seed=0, normalize="cifar10")
  x = it.batch_at(0)["inputs"]
  mean, std = (np.asarray(v, np.float64) for v in ip.NORMALIZE["cifar10"])
  got = np.asarray(ip.device_normaliser("cifar10")(x), np.float64)
  want = (raw[it.global_indices(0)].astype(np.float64) / 255 - mean) / std
  np.testing.assert_allclose(got, want, atol=1e-5)
  per = ip.load_arrays(_dcfg(name="npz", data_dir=str(tmp_path), input_shape=(4, 4, 3),
                             num_classes=2, normalize="per_dataset"))
  assert per["train"].inputs.dtype == np.float32 and abs(per["train"].inputs.mean()) < 1e-5


def test_tfds_without_tensorflow_gives_install_instructions():
  try:
    import tensorflow_datasets  # noqa: F401
    has_tfds = True
  except ImportError:
    has_tfds = False
  if has_tfds:
    with pytest.raises(ValueError, match="tfds build"):
      ip.tfds_num_examples(_dcfg(name="tfds", tfds_name="cifar10", data_dir="/nonexistent"),
                           "train")
  else:
    with pytest.raises(ImportError, match=r"mixjax\[data\]"):
      ip.tfds_num_examples(_dcfg(name="tfds", tfds_name="cifar10"), "train")


def test_text_splits_number_sorted_labels_and_refuse_unknown_ones():
  train = (["10", "2", "2"], ["a b", "b c", "c"])
  d = text.text_splits(train, (["10"], ["a z"]), vocab_size=10, max_len=3, num_classes=2)
  assert d["train"].labels.tolist() == [1, 0, 0]  # digits sort numerically: '2' < '10'
  assert d["eval"].inputs.dtype == np.int32 and d["eval"].inputs.shape == (1, 3)
  assert d["eval"].inputs[0].tolist()[1:] == [1, 0]  # 'z' unknown, then padding
  with pytest.raises(ValueError, match="num_classes=1"):
    text.text_splits(train, (["2"], ["a"]), vocab_size=10, max_len=3, num_classes=1)
  with pytest.raises(ValueError, match=r"\['7'\] of the eval split"):
    text.text_splits(train, (["7"], ["a"]), vocab_size=10, max_len=3, num_classes=2)


def test_normalise_uses_the_named_constants_and_leaves_tokens_alone():
  x = np.full((2, 3, 3, 3), 0.5, np.float32)
  out = augment.normalise(x, "imagenet")
  mean, std = ip.NORMALIZE["imagenet"]
  np.testing.assert_allclose(out[0, 0, 0], (0.5 - np.array(mean)) / np.array(std), rtol=1e-6)
  assert augment.normalise(x, "none") is x and augment.normalise(x, "per_dataset") is x
  tokens = np.ones((2, 5), np.int32)
  assert augment.normalise(tokens, "imagenet") is tokens
  with pytest.raises(ValueError, match="dataset.normalize='nope'"):
    augment.normalise(x, "nope")


@pytest.mark.parametrize("augment_kind", ["cifar", "flip", "none", "inception"])
def test_uint8_images_cross_as_uint8_and_normalise_on_device_as_on_the_host(augment_kind):
  """uint8 images leave the iterators as uint8 (resized ones rounded); the jitted device
  half gives the numbers the host gave for the same images as floats in [0, 1] (within the
  rounding of a resize: half a grey level)."""
  import jax
  raw = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  as_uint8 = ip.ArrayDataset(raw, np.arange(12) % 3, 3)
  as_float = ip.ArrayDataset(raw.astype(np.float32) / np.float32(255.0), np.arange(12) % 3, 3)
  shape = (6, 6, 3) if augment_kind == "inception" else (8, 8, 3)
  kw = dict(seed=3, augment=augment_kind, out_shape=shape, normalize="cifar10", prefetch=0)
  got, want = (ip.TrainIterator(d, 4, **kw).batch_at(5) for d in (as_uint8, as_float))
  ev_got, ev_want = (next(ip.eval_batches(d, 4, augment=augment_kind, out_shape=shape,
                                          normalize="cifar10")) for d in (as_uint8, as_float))
  on_device = jax.jit(ip.device_normaliser("cifar10"))
  std = np.asarray(augment.NORMALIZE["cifar10"][1], np.float32)
  rounding = 0.5 / 255 / std.min() if augment_kind == "inception" else 0.0
  for g, w in ((got, want), (ev_got, ev_want)):
    assert g["inputs"].dtype == np.uint8
    np.testing.assert_array_equal(g["labels"], w["labels"])
    x = np.asarray(on_device(g["inputs"]))
    assert x.dtype == np.float32 and x.shape == w["inputs"].shape
    np.testing.assert_allclose(x, w["inputs"], rtol=0, atol=rounding + 1e-6)
    if rounding:  # Rounded, not truncated: errors on both sides, most pixels moved.
      err = (x - w["inputs"]) * std
      assert err.min() < -0.2 / 255 and err.max() > 0.2 / 255
  # Floats (host-normalised) and token ids pass through the device half unchanged.
  tokens = np.ones((2, 5), np.int32)
  assert ip.device_normaliser("imagenet")(tokens) is tokens
  assert ip.device_normaliser("none")(want["inputs"]) is want["inputs"]
  np.testing.assert_allclose(ip.device_normaliser("none")(raw), raw / 255.0, atol=1e-7)
  with pytest.raises(ValueError, match="dataset.normalize='nope'"):
    ip.device_normaliser("nope")


def test_importing_the_package_does_not_import_tensorflow():
  code = ("import sys, mixjax.input_pipeline as ip; "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_package_modules_import_each_other_without_cycles():
  package = os.path.dirname(ip.__file__)
  deps = {}
  for path in sorted(glob.glob(os.path.join(package, "*.py"))):
    name = os.path.basename(path)[:-3]
    tree = ast.parse(open(path, encoding="utf-8").read())
    deps[name] = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "mixjax.input_pipeline":
        deps[name] |= {a.name for a in node.names}  # from mixjax.input_pipeline import m
      elif isinstance(node, ast.ImportFrom) and node.module:
        deps[name] |= {node.module.split(".")[2]} if node.module.startswith(
            "mixjax.input_pipeline.") else set()
      elif isinstance(node, ast.Import):
        deps[name] |= {a.name.split(".")[2] for a in node.names
                       if a.name.startswith("mixjax.input_pipeline.")}
  assert {"augment", "datasets", "iterators", "sources", "text", "tfds_data"} <= set(deps)
  order = []  # Kahn's algorithm: every module must eventually have all its imports placed.
  while len(order) < len(deps):
    ready = [m for m in deps if m not in order and deps[m] <= set(order)]
    assert ready, f"import cycle among {sorted(set(deps) - set(order))}: {deps}"
    order += sorted(ready)
  exported = set(ip.__all__)
  assert all(hasattr(ip, name) for name in exported)
  assert not {"normalise", "text_splits", "tfds_text"} & exported  # shared helpers stay internal
