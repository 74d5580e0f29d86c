"""TensorFlow Datasets: builders, tf.data preprocessing, training and eval streams.

`dataset.name='tfds'` reads `tfds_name` from TensorFlow Datasets (needs the
optional extra `pip install mixjax[data]`, i.e. tensorflow-cpu +
tensorflow-datasets, and the dataset prepared in `data_dir`; ImageNet must be
downloaded manually, see the TFDS catalog). TensorFlow is imported only when
one of these functions runs, never when `mixjax` is imported.

Images are augmented in TensorFlow with stateless ops seeded by (seed, element
index), mirroring the NumPy augmentations of `augment` ('inception', 'cifar',
'flip', 'none') and its `NORMALIZE` constants; uint8 images (resized ones
rounded back to uint8) leave as uint8 and are normalised on the device; audio (speech commands) becomes
log-spectrograms. Text datasets (int32 inputs) are read into memory by
`tfds_text` and then go through the in-memory iterators.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from mixjax.input_pipeline.augment import NORMALIZE
from mixjax.input_pipeline.datasets import ArrayDataset
from mixjax.input_pipeline.text import text_splits


def _import_tfds():
  try:
    import tensorflow as tf  # noqa: F401
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        "dataset.name='tfds' needs TensorFlow Datasets, an optional extra: "
        "`pip install 'mixjax[data]'` (tensorflow-cpu, tensorflow-datasets), then prepare the "
        "dataset with `tfds build <name> --data_dir <dir>` (ImageNet: download the archives "
        "manually, see https://www.tensorflow.org/datasets/catalog/imagenet2012). Offline, use "
        "--config.dataset.name=synthetic.") from e
  return tf, tfds


def _tfds_builder(dcfg: Any):
  tf, tfds = _import_tfds()
  where = dcfg.data_dir or "~/tensorflow_datasets"
  build = (f"run `tfds build {dcfg.tfds_name} --data_dir <dir>` (or prepare it with your own "
           "builder) and set config.dataset.data_dir")
  try:
    builder = tfds.builder(dcfg.tfds_name, data_dir=dcfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset.tfds_name={dcfg.tfds_name!r} is neither a TFDS catalogue "
                     f"name nor a dataset prepared in {where}: {build}.") from e
  splits = dict(builder.info.splits)
  if not splits:
    raise ValueError(f"TFDS dataset {dcfg.tfds_name!r} is not prepared in {where}: {build}.")
  for key in ("train_split", "eval_split"):
    base = dcfg[key].split("[")[0]
    if base not in splits:
      raise ValueError(f"config.dataset.{key}={dcfg[key]!r} is not a split of TFDS "
                       f"{dcfg.tfds_name!r}; its splits are {sorted(splits)}.")
  return tf, tfds, builder


def tfds_text(dcfg: Any) -> dict[str, ArrayDataset]:
  """Text classification TFDS datasets (e.g. 'glue/sst2') as in-memory token arrays.

  Returns {'train', 'eval'}: ArrayDataset of int32[N, input_shape[0]] token ids
  (see `text.text_splits`), from the 'sentence' (or 'text') and 'label' features.
  """
  _, tfds, builder = _tfds_builder(dcfg)

  def read(split):
    labels, texts = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      text = ex.get("sentence", ex.get("text"))
      labels.append(str(int(ex["label"])))
      texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return labels, texts
  return text_splits(read(dcfg.train_split), read(dcfg.eval_split), dcfg.vocab_size,
                     dcfg.input_shape[0], dcfg.num_classes)


def _check_image_shape(builder: Any, dcfg: Any) -> None:
  """ValueError, before any reading, if the stored images cannot become `input_shape`."""
  feature = builder.info.features["image"] if "image" in builder.info.features else None
  if feature is None or dcfg.augment == "inception":
    return
  stored, want = tuple(feature.shape), tuple(dcfg.input_shape)
  if None in stored[:2]:
    raise ValueError(f"TFDS {dcfg.tfds_name!r} has images of varying size {stored}: set "
                     "config.dataset.augment='inception' (random-resized crop for training, "
                     "centre crop for evaluation), which resizes them to input_shape.")
  if stored[:2] != want[:2] or (stored[2] is not None and stored[2] != want[2]):
    raise ValueError(f"config.dataset.input_shape={want} but TFDS {dcfg.tfds_name!r} stores "
                     f"images of shape {stored}: set input_shape to match, or "
                     "augment='inception' to crop and resize.")


def tfds_num_examples(dcfg: Any, split: str) -> int:
  """Number of examples of `split` (a split name, no slicing) of TFDS `dcfg.tfds_name`."""
  _, _, builder = _tfds_builder(dcfg)
  return builder.info.splits[split].num_examples


def _tf_preprocess(tf, dcfg: Any, train: bool, seed_pair: Any):
  """Returns fn(features) -> (inputs, label int32) in TensorFlow.

  inputs: uint8 images (decoded JPEGs and uint8 arrays; 'inception' rounds its
  bilinear resize back to uint8, as PIL-based pipelines do) and f32
  log-spectrograms for audio; uint8 images are normalised on the device by
  `augment.device_normaliser(dcfg.normalize)`, with the same arithmetic as the
  host's float path below.
  """
  shape = tuple(dcfg.input_shape)
  kind = dcfg.augment
  mean_std = NORMALIZE.get(dcfg.normalize)

  def image_fn(features, seed):
    image = features["image"]
    if kind == "inception":
      encoded = image.dtype == tf.string
      if encoded:  # JPEGs are decoded only inside the crop; PNGs and others whole.
        is_jpeg = tf.io.is_jpeg(image)
        decode = lambda: tf.io.decode_image(image, channels=shape[-1],  # noqa: E731
                                            expand_animations=False)
        img_shape = tf.cond(is_jpeg, lambda: tf.io.extract_jpeg_shape(image),
                            lambda: tf.shape(decode()))
      else:
        img_shape = tf.shape(image)
      if train:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            img_shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
        crop = tf.stack([begin[0], begin[1], size[0], size[1]])
      else:
        h, w = img_shape[0], img_shape[1]
        side = tf.cast(0.875 * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
        crop = tf.stack([(h - side) // 2, (w - side) // 2, side, side])
      if encoded:
        image = tf.cond(is_jpeg,
                        lambda: tf.image.decode_and_crop_jpeg(image, crop, channels=shape[-1]),
                        lambda: tf.image.crop_to_bounding_box(decode(), crop[0], crop[1],
                                                              crop[2], crop[3]))
        image.set_shape([None, None, shape[-1]])
      else:
        image = tf.image.crop_to_bounding_box(image, crop[0], crop[1], crop[2], crop[3])
      source = image.dtype
      image = tf.image.resize(image, shape[:2], method="bilinear")
      if source == tf.uint8:  # Rounded back to uint8, as augment._bilinear_crops does.
        image = tf.saturate_cast(tf.round(image), tf.uint8)
    else:  # Crops, pads and flips only move pixels: uint8 images stay uint8.
      if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=shape[-1], expand_animations=False)
      if train and kind == "cifar":
        image = tf.image.pad_to_bounding_box(image, 4, 4, shape[0] + 8, shape[1] + 8)
        image = tf.image.stateless_random_crop(image, shape, seed=seed)
    if train and kind in ("inception", "cifar", "flip"):
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    if image.dtype == tf.uint8:  # Normalised on the device (augment.device_normaliser).
      return tf.ensure_shape(image, shape)
    image = tf.cast(image, tf.float32) / 255.0
    if mean_std is not None:
      image = (image - tf.constant(mean_std[0])) / tf.constant(mean_std[1])
    return tf.ensure_shape(image, shape)

  def audio_fn(features):
    # Speech commands: 1 s at 16 kHz -> log |STFT| of 20 ms windows every 10 ms,
    # 160 frequency bins x 101 frames (mixup paper: 160x101 spectrograms).
    audio = tf.cast(features["audio"], tf.float32) / 32768.0
    audio = tf.pad(audio, [[0, tf.maximum(0, 16000 - tf.shape(audio)[0])]])[:16000]
    spec = tf.abs(tf.signal.stft(audio, frame_length=320, frame_step=160, fft_length=318,
                                 pad_end=True))
    spec = tf.math.log(spec + 1e-6)
    spec = tf.pad(spec, [[0, 101 - tf.shape(spec)[0]], [0, 0]])[:101]
    return tf.ensure_shape(tf.transpose(spec)[..., None], shape)

  def fn(index, features):
    seed = tf.stack([tf.cast(seed_pair, tf.int64), tf.cast(index, tf.int64)])
    label = tf.cast(features["label"], tf.int32)
    if dcfg.label_corruption and train:
      h = tf.strings.to_hash_bucket_fast(
          tf.strings.join([features["tfds_id"], str(dcfg.corruption_seed)]), 2 ** 31 - 1)
      corrupt = tf.cast(h % 1000003, tf.float32) < dcfg.label_corruption * 1000003
      label = tf.where(corrupt, tf.cast((h // 1000003) % dcfg.num_classes, tf.int32), label)
    x = audio_fn(features) if "audio" in features else image_fn(features, seed)
    return {"inputs": x, "labels": label}
  return fn


class TfdsTrainIterator:
  """TFDS training batches for this process (tf.data, deterministic, resumable by skipping).

  The per-host split is `tfds.split_for_jax_process`; the stream is repeated,
  shuffled with a fixed seed, augmented with stateless ops seeded by (seed,
  element index), batched, and `start_step` batches are skipped on resume.
  """

  def __init__(self, dcfg: Any, global_batch: int, *, seed: int, process_index: int = 0,
               process_count: int = 1, start_step: int = 0, shuffle_buffer: int = 50_000,
               threads: Optional[int] = None):
    """`threads`: size of a private tf.data thread pool (default: TF's shared pool)."""
    tf, tfds, builder = _tfds_builder(dcfg)
    _check_image_shape(builder, dcfg)
    split = tfds.split_for_jax_process(dcfg.train_split, process_index=process_index,
                                       process_count=process_count)
    read = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True)
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read, decoders=decoders)
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
      opts.threading.private_threadpool_size = threads
    ds = ds.with_options(opts).repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
    ds = ds.map(_tf_preprocess(tf, dcfg, True, seed), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(global_batch // process_count, drop_remainder=True).skip(start_step)
    self._it = iter(tfds.as_numpy(ds.prefetch(dcfg.prefetch or tf.data.AUTOTUNE)))
    self.step = start_step
    self.steps_per_epoch = builder.info.splits[dcfg.train_split].num_examples // global_batch

  def __iter__(self):
    return self

  def __next__(self):
    self.step += 1
    return next(self._it)

  def state(self) -> dict[str, int]:
    return {"step": self.step}

  def close(self) -> None:
    pass


def tfds_eval_batches(dcfg: Any, global_batch: int, *, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """TFDS eval batches for this process, padded, with 'mask'."""
  tf, tfds, builder = _tfds_builder(dcfg)
  _check_image_shape(builder, dcfg)
  split = tfds.split_for_jax_process(dcfg.eval_split, process_index=process_index,
                                     process_count=process_count, drop_remainder=False)
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  ds = ds.enumerate().map(_tf_preprocess(tf, dcfg, False, 0), num_parallel_calls=tf.data.AUTOTUNE)
  local = global_batch // process_count
  # Every process must run the same number of eval steps: pad with empty batches.
  total = builder.info.splits[dcfg.eval_split].num_examples
  num_batches = -(-(-(-total // process_count)) // local)
  template = None
  for batch in tfds.as_numpy(ds.batch(local)):
    n = len(batch["labels"])
    pad = local - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch["mask"] = mask
    template = batch
    num_batches -= 1
    yield batch
  for _ in range(max(num_batches, 0)):
    yield {k: np.zeros_like(v) for k, v in template.items()}
