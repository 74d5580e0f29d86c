"""The shared bases of the recipes in configs/ (each recipe file calls one of these).

    image_config('cifar10', 'preact_resnet18', paper, method)  # 32x32 / 28x28 images
    mixupe_imagenet(arg, 'resnet50', alpha, eta)                # MixupE ImageNet, Table 3
    text_config('trec', 'kim_cnn', method, point)               # AMP text setups

Each returns a full `config_utils.base_config()` with the paper's settings; the
recipe files add what is their own.
"""

from __future__ import annotations

from typing import Optional

from mixjax import config_utils

ConfigDict = config_utils.ConfigDict

# ----------------------------------------------------------------------------- small images

# name -> (tfds name, eval split, classes, input shape, normalisation)
IMAGE_DATASETS = {
    "cifar10": ("cifar10", "test", 10, (32, 32, 3), "cifar10"),
    "cifar100": ("cifar100", "test", 100, (32, 32, 3), "cifar100"),
    "svhn": ("svhn_cropped", "test", 10, (32, 32, 3), "svhn"),
    "mnist": ("mnist", "test", 10, (28, 28, 1), "mnist"),
    "fashion_mnist": ("fashion_mnist", "test", 10, (28, 28, 1), "fashion_mnist"),
}


def image_config(dataset: str, model: str, paper: str, method: str) -> ConfigDict:
  """PreActResNet/WRN recipes of the mixup, Untied MixUp and MixupE papers.

  paper='mixup': batch 128, per-batch pairing (mixup_beyond_erm, section 3.2).
  paper='untied': per-example lam, two shuffled copies of the training set
    paired each epoch (untied_mixup_directional_adversarial_training, 6.1).
  paper='mixupe': batch 100, SGD 0.1, steps at 100 / 150 (mixupe, section 4.1).
  All: 200 epochs, SGD momentum 0.9, weight decay 1e-4, lr / 10 at 100, 150.
  """
  if paper not in ("mixup", "untied", "mixupe"):
    raise ValueError(f"paper must be mixup, untied or mixupe, got {paper!r}.")
  tfds_name, eval_split, classes, shape, norm = IMAGE_DATASETS[dataset]
  c = config_utils.base_config()
  c.method = method
  c.mix.alpha = 1.0
  c.model.name = model
  c.dataset.name = "tfds"
  c.dataset.tfds_name = tfds_name
  c.dataset.eval_split = eval_split
  c.dataset.num_classes = classes
  c.dataset.input_shape = shape
  c.dataset.augment = "cifar" if shape[-1] == 3 else "none"
  c.dataset.normalize = norm
  c.batch_size = 100 if paper == "mixupe" else 128
  c.eval_batch_size = 1000
  c.num_epochs = 200.0
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "piecewise"
  c.schedule.boundaries_epochs = (100, 150)
  c.schedule.decay_factor = 0.1
  if paper == "untied":
    c.dataset.epoch_pairing = True
    c.mix.pairing = "reverse"
    c.mix.cosine_dim = 700 if classes == 100 else 300
  if paper == "mixup":
    c.mix.lam_scope = "batch"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  return c


# ----------------------------------------------------------------------------- ImageNet (MixupE)


def mixupe_imagenet(arg: Optional[str], model: str, alpha: float, eta: float) -> ConfigDict:
  """224x224 Inception crops, 100K steps at global batch 4096, warm-up + cosine to peak/1000.

  Linear warm-up from 0 over 5 epochs (the paper does not give the length),
  batch norm over the global batch, Polyak EMA 0.999 of params and batch
  statistics, bf16 compute with f32 weights. `arg` takes res, method, batch and
  steps; the caller sets the optimizer.
  """
  a = config_utils.parse_arg(arg, res=224, method="mixup", batch=4096, steps=100_000)
  c = config_utils.base_config()
  c.method = a.method
  c.mix.alpha = alpha
  c.mixupe.eta = eta
  c.model.name = model
  c.model.dtype = "bfloat16"
  c.dataset.name = "tfds"
  c.dataset.tfds_name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.num_classes = 1000
  c.dataset.input_shape = (a.res, a.res, 3)
  c.dataset.augment = "inception"
  c.dataset.normalize = "imagenet"
  c.batch_size = a.batch
  c.eval_batch_size = 1024
  c.total_steps = a.steps
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.end_factor = 1e-3
  c.ema_decay = 0.999
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  return c


def adamw(c: ConfigDict, weight_decay: float) -> ConfigDict:
  """AdamW at peak 1e-3, b1 = 0.9, b2 = 0.99 (ViT-B/16, CoAtNet-0)."""
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = weight_decay
  return c


# ----------------------------------------------------------------------------- text (AMP)

# Submodule paths of the text models' word embeddings and sentence representation.
TEXT_POINTS = {"word": "embed", "sent": "sentence"}


def text_point(name: str) -> str:
  """The mixing point of `:point=word|sent` (a submodule path of kim_cnn / bilstm_attention)."""
  if name not in TEXT_POINTS:
    raise ValueError(f"point must be one of {sorted(TEXT_POINTS)}, got {name!r}.")
  return TEXT_POINTS[name]


def text_config(dataset: str, model: str, method: str, point: str) -> ConfigDict:
  """AMP (amp_adversarial_mixing_policy) text setups.

  Adam lr 2e-4, batch 50, 8k steps, 300-d randomly initialised embeddings,
  alpha 1, AMP eps 0.002. Mixing at `point`: the word embeddings ('Word') or
  the sentence representation ('Sent'), as submodule paths of the model.
  TREC (6 coarse classes) is not in TFDS: put `train.tsv` / `test.tsv`
  ('label<TAB>question' lines) in `dataset.data_dir`. SST-2 comes from TFDS
  'glue/sst2' (eval on its validation split) or the same TSV format.
  """
  c = config_utils.base_config()
  c.method = method
  c.mix.alpha = 1.0
  c.mix.point = point
  c.amp.eps = 0.002
  c.model.name = model
  if dataset == "trec":
    c.dataset.name = "tsv"
    c.dataset.data_dir = "data/trec"
    c.dataset.num_classes = 6
    c.dataset.input_shape = (40,)
  else:
    c.dataset.name = "tfds"
    c.dataset.tfds_name = "glue/sst2"
    c.dataset.eval_split = "validation"
    c.dataset.num_classes = 2
    c.dataset.input_shape = (64,)
  c.dataset.input_dtype = "int32"
  c.dataset.vocab_size = 20000
  c.batch_size = 50
  c.eval_batch_size = 500
  c.total_steps = 8000
  c.optimizer.name = "adam"
  c.optimizer.lr = 2e-4
  c.schedule.name = "constant"
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 2000
  return c
