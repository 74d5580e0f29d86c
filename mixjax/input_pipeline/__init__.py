"""Input pipelines: in-memory NumPy datasets and TFDS, deterministic by step.

The training batch of step `s` is a pure function of (seed, s), so resuming
needs only the step, and a global batch does not depend on how many hosts
share it (see `iterators`). The package's modules, one per seam:

  datasets   `ArrayDataset`, `SyntheticDataset`: in-memory splits.
  text       tokenisation, vocabularies (`build_vocab`, `encode`), token splits.
  sources    `load_arrays` for the in-memory sources (scikit-learn digits/iris,
             synthetic, npz, tsv, TFDS text), `corrupt_labels`.
  augment    NumPy crops, flips, inception boxes, the eval transform, the
             `NORMALIZE` constants and `device_normaliser` (uint8 images are
             normalised inside the jitted steps).
  iterators  `TrainIterator` and `eval_batches` over in-memory datasets.
  tfds_data  TFDS builders and tf.data preprocessing: `TfdsTrainIterator`,
             `tfds_eval_batches`, `tfds_num_examples` (TensorFlow is imported
             only when these run).

This module re-exports the public API; helpers shared between the modules
stay importable from their module only.
"""

from mixjax.input_pipeline.augment import (NORMALIZE, augment_batch, device_normaliser,
                                           eval_transform, inception_boxes)
from mixjax.input_pipeline.datasets import ArrayDataset, SyntheticDataset
from mixjax.input_pipeline.iterators import TrainIterator, eval_batches
from mixjax.input_pipeline.sources import corrupt_labels, load_arrays
from mixjax.input_pipeline.text import build_vocab, encode
from mixjax.input_pipeline.tfds_data import TfdsTrainIterator, tfds_eval_batches, tfds_num_examples

__all__ = [
    "ArrayDataset",
    "NORMALIZE",
    "SyntheticDataset",
    "TfdsTrainIterator",
    "TrainIterator",
    "augment_batch",
    "device_normaliser",
    "build_vocab",
    "corrupt_labels",
    "encode",
    "eval_batches",
    "eval_transform",
    "inception_boxes",
    "load_arrays",
    "tfds_eval_batches",
    "tfds_num_examples",
]
