"""Shared settings of the 32x32 / 28x28 image recipes (not a config itself)."""

from mixjax import config_utils

# name -> (tfds name, eval split, classes, input shape, normalisation)
DATASETS = {
    "cifar10": ("cifar10", "test", 10, (32, 32, 3), "cifar10"),
    "cifar100": ("cifar100", "test", 100, (32, 32, 3), "cifar100"),
    "svhn": ("svhn_cropped", "test", 10, (32, 32, 3), "svhn"),
    "mnist": ("mnist", "test", 10, (28, 28, 1), "mnist"),
    "fashion_mnist": ("fashion_mnist", "test", 10, (28, 28, 1), "fashion_mnist"),
}


def image_config(dataset: str, model: str, paper: str, method: str):
  """PreActResNet/WRN recipes of the mixup, Untied MixUp and MixupE papers.

  paper='mixup': batch 128, per-batch pairing (mixup_beyond_erm, section 3.2).
  paper='untied': per-example lam, two shuffled copies of the training set
    paired each epoch (untied_mixup_directional_adversarial_training, 6.1).
  paper='mixupe': batch 100, SGD 0.1, steps at 100 / 150 (mixupe, section 4.1).
  All: 200 epochs, SGD momentum 0.9, weight decay 1e-4, lr / 10 at 100, 150.
  """
  if paper not in ("mixup", "untied", "mixupe"):
    raise ValueError(f"paper must be mixup, untied or mixupe, got {paper!r}.")
  tfds_name, eval_split, classes, shape, norm = DATASETS[dataset]
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
    c.mix.per_example = False
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  return c
