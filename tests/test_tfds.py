"""The TFDS input path (`dataset.name='tfds'`) on small datasets the tests write themselves.

Each dataset is stored with `tfds.dataset_builders.store_as_tfds_dataset` into a
temporary `data_dir`, so `tfds.builder(name, data_dir=...)` reads real
TFRecord files with JPEG/PNG-encoded images, as for ImageNet or CIFAR.
Nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import train_testlib as lib  # noqa: E402
from mixjax import config_utils  # noqa: E402
from mixjax import input_pipeline as ip  # noqa: E402

import train  # noqa: E402

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 24, 7, 3


def _write(data_dir: str, name: str, encoding: str, sizes: tuple[int, int],
           shape=(None, None, 3)) -> None:
  """Writes `name` (train/test splits of random images, label = index % 3) into data_dir."""
  def split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (int(rng.integers(*sizes)), int(rng.integers(*sizes)), 3),
                           dtype=np.uint8) for _ in range(n)]
    gen = lambda: ({"image": im, "label": i % NUM_CLASSES} for i, im in enumerate(images))  # noqa: E731
    return tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec((None, None, 3), tf.uint8), "label": tf.TensorSpec((), tf.int64)})
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape, encoding_format=encoding),
      "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, config="default", version="1.0.0", data_dir=data_dir, features=features,
      split_datasets={"train": split(NUM_TRAIN, 0), "test": split(NUM_TEST, 1)})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  _write(d, "tiny_jpeg", "jpeg", (20, 40))   # variable-size photos: ImageNet-style path
  _write(d, "tiny_png", "png", (32, 33), (32, 32, 3))  # 32x32 PNGs: CIFAR-style path
  return d


def _dcfg(data_dir, name="tiny_jpeg", **kw):
  c = config_utils.base_config().dataset
  c.update(dict(name="tfds", tfds_name=name, data_dir=data_dir, input_shape=(16, 16, 3),
                augment="inception", num_classes=NUM_CLASSES, eval_split="test"))
  c.update(kw)
  return c


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def test_inception_batches_have_the_configured_shape_and_are_normalised(data_dir):
  d = _dcfg(data_dir)
  assert ip.tfds_num_examples(d, "train") == NUM_TRAIN
  (batch,) = _take(ip.TfdsTrainIterator(d, 8, seed=0), 1)
  # The resize is rounded back to uint8; the device half normalises it.
  assert batch["inputs"].shape == (8, 16, 16, 3) and batch["inputs"].dtype == np.uint8
  assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
  assert set(batch["labels"]) <= set(range(NUM_CLASSES))
  x = np.asarray(ip.device_normaliser(d.normalize)(batch["inputs"]))
  # ImageNet mean/std normalisation of uniform noise: mean near 0, values in a bounded range.
  assert np.all(np.isfinite(x)) and np.abs(x).max() < 3.0
  assert abs(float(x.mean())) < 0.5


def test_stream_is_deterministic_and_resumes_by_step(data_dir):
  d = _dcfg(data_dir)
  stream = _take(ip.TfdsTrainIterator(d, 8, seed=5), 5)
  again = _take(ip.TfdsTrainIterator(d, 8, seed=5), 5)
  for a, b in zip(stream, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  # An iterator restarted at step 3 continues the uninterrupted stream.
  resumed = _take(ip.TfdsTrainIterator(d, 8, seed=5, start_step=3), 2)
  for a, b in zip(stream[3:], resumed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  other = _take(ip.TfdsTrainIterator(d, 8, seed=6), 1)[0]
  assert not np.array_equal(other["inputs"], stream[0]["inputs"])


def test_each_process_reads_its_own_share(data_dir):
  d = _dcfg(data_dir)
  parts = [_take(ip.TfdsTrainIterator(d, 8, seed=0, process_index=p, process_count=2), 1)[0]
           for p in range(2)]
  assert all(p["inputs"].shape == (4, 16, 16, 3) for p in parts)
  assert not np.array_equal(parts[0]["inputs"], parts[1]["inputs"])


def test_eval_is_centre_crop_padded_and_equal_length_on_every_process(data_dir):
  d = _dcfg(data_dir)
  batches = list(ip.tfds_eval_batches(d, 4))
  assert [b["inputs"].shape for b in batches] == [(4, 16, 16, 3)] * 2
  assert sum(float(b["mask"].sum()) for b in batches) == NUM_TEST
  # Every test example once (TFDS stores examples in its own shuffled order).
  np.testing.assert_array_equal(
      np.bincount(np.concatenate([b["labels"][b["mask"] > 0] for b in batches])),
      np.bincount(np.arange(NUM_TEST) % NUM_CLASSES))
  # Deterministic: eval is a fixed centre crop.
  np.testing.assert_array_equal(list(ip.tfds_eval_batches(d, 4))[0]["inputs"],
                                batches[0]["inputs"])
  per_process = [list(ip.tfds_eval_batches(d, 4, process_index=p, process_count=2))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1])
  assert sum(float(b["mask"].sum()) for bs in per_process for b in bs) == NUM_TEST


def test_cifar_pad_crop_flip_on_png_images(data_dir):
  d = _dcfg(data_dir, name="tiny_png", augment="cifar", input_shape=(32, 32, 3))
  (batch,) = _take(ip.TfdsTrainIterator(d, 8, seed=0), 1)
  assert batch["inputs"].shape == (8, 32, 32, 3)


def test_unresized_images_cross_as_uint8_and_normalise_on_device_as_tf_did(data_dir):
  """Crops and flips move uint8 pixels; the device half does TF's former float arithmetic."""
  import jax
  d = _dcfg(data_dir, name="tiny_png", augment="cifar", input_shape=(32, 32, 3),
            normalize="cifar10")
  (batch,) = _take(ip.TfdsTrainIterator(d, 8, seed=0), 1)
  (ev, _) = list(ip.tfds_eval_batches(d, 4))
  ev_raw = ev
  mean, std = ip.NORMALIZE["cifar10"]
  for x in (batch["inputs"], ev["inputs"]):
    assert x.dtype == np.uint8
    host = ((tf.cast(x, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)).numpy()
    np.testing.assert_allclose(jax.jit(ip.device_normaliser("cifar10"))(x), host, rtol=0,
                               atol=1e-6)
  # Resized (Inception) images: TF's float resize rounded to uint8, normalised on the device
  # within half a grey level of TF normalising the unrounded resize.
  d = _dcfg(data_dir, name="tiny_png", augment="inception", input_shape=(16, 16, 3),
            normalize="cifar10")
  (ev, _) = list(ip.tfds_eval_batches(d, 4))
  assert ev["inputs"].dtype == np.uint8
  raw = tf.constant(ev_raw["inputs"])  # The same images, unresized (augment='cifar' at eval).
  side = int(0.875 * 32)
  crop = tf.image.crop_to_bounding_box(raw, (32 - side) // 2, (32 - side) // 2, side, side)
  host = ((tf.image.resize(crop, (16, 16), method="bilinear") / 255.0 - tf.constant(mean))
          / tf.constant(std)).numpy()
  got = np.asarray(jax.jit(ip.device_normaliser("cifar10"))(ev["inputs"]))
  np.testing.assert_allclose(got, host, rtol=0, atol=0.5 / 255 / min(std) + 1e-6)


def test_label_corruption_changes_a_fixed_fraction_of_training_labels_only(data_dir):
  def labels(**kw):
    d = _dcfg(data_dir, name="tiny_png", augment="none", input_shape=(32, 32, 3), **kw)
    # shuffle_buffer=1 and a single file: the stored order, the same for every call.
    batches = _take(ip.TfdsTrainIterator(d, NUM_TRAIN, seed=0, shuffle_buffer=1), 1)
    return batches[0]["labels"]
  clean = labels()
  noisy = labels(label_corruption=0.5, corruption_seed=1)
  again = labels(label_corruption=0.5, corruption_seed=1)
  np.testing.assert_array_equal(noisy, again)
  changed = float(np.mean(noisy != clean))
  assert 0.0 < changed < 0.7, changed
  assert not np.array_equal(noisy, labels(label_corruption=0.5, corruption_seed=2))
  # Evaluation labels are never corrupted.
  d = _dcfg(data_dir, label_corruption=0.5, corruption_seed=1)
  clean_eval = _dcfg(data_dir, name="tiny_png", augment="none", input_shape=(32, 32, 3))
  for a, b in zip(ip.tfds_eval_batches(d, 4), ip.tfds_eval_batches(clean_eval, 4)):
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_images_that_cannot_become_input_shape_are_refused_up_front(data_dir):
  with pytest.raises(ValueError, match="varying size.*augment='inception'"):
    ip.TfdsTrainIterator(_dcfg(data_dir, augment="cifar"), 8, seed=0)
  with pytest.raises(ValueError, match=r"input_shape=\(16, 16, 3\).*\(32, 32, 3\)"):
    list(ip.tfds_eval_batches(_dcfg(data_dir, name="tiny_png", augment="none"), 4))


def test_missing_dataset_names_the_build_command(data_dir):
  with pytest.raises(ValueError, match="neither a TFDS catalogue name.*tfds build"):
    ip.tfds_num_examples(_dcfg(data_dir, name="not_prepared_here"), "train")
  with pytest.raises(ValueError, match="not prepared in .*tfds build cifar10"):
    ip.tfds_num_examples(_dcfg(data_dir, name="cifar10"), "train")
  with pytest.raises(ValueError, match=r"eval_split='validation'.*\['test', 'train'\]"):
    ip.tfds_num_examples(_dcfg(data_dir, eval_split="validation"), "train")


def test_train_py_trains_and_resumes_on_a_tfds_dataset(data_dir, tmp_path):
  overrides = [f"dataset.data_dir={data_dir}", "dataset.name=tfds", "dataset.tfds_name=tiny_jpeg",
               "dataset.input_shape=(16, 16, 3)", "dataset.augment=inception",
               f"dataset.num_classes={NUM_CLASSES}", "dataset.eval_split=test",
               "batch_size=8", "eval_batch_size=8", "total_steps=4", "checkpoint_every_steps=2"]
  c = config_utils.apply_overrides(lib.tiny_config(steps=4), overrides)
  workdir = str(tmp_path / "run")
  (full,) = train.train_and_evaluate(c, workdir, model=lib.TinyCNN(num_classes=NUM_CLASSES))
  assert full["step"] == 4 and 0.0 <= full["eval"]["top1"] <= 1.0
  # Stop after step 2, then resume from the checkpoint: same final loss.
  other = str(tmp_path / "resumed")
  train.train_and_evaluate(c, other, model=lib.TinyCNN(num_classes=NUM_CLASSES), max_steps=2)
  (resumed,) = train.train_and_evaluate(c, other, model=lib.TinyCNN(num_classes=NUM_CLASSES))
  assert resumed["step"] == 4
  assert lib.train_losses(workdir) == lib.train_losses(other)
  assert os.path.isdir(os.path.join(other, "checkpoints"))
