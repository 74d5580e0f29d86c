"""ResNet-50 on ImageNet, the mixup paper recipe (section 3.1 of mixup_beyond_erm).

Batch 1024, Goyal et al. schedule: lr rises linearly from 0.1 to 0.4 over the
first 5 epochs, then is divided by 10 after epochs 30, 60, 80 (90 epochs) or
60, 120, 180 (`:epochs=200`); SGD momentum 0.9, weight decay 1e-4,
Inception-style crops and flips, 224x224 centre crop for eval, alpha 0.2.
Paper top-1 error: ERM 23.5 / mixup 23.3 (90 epochs), 23.6 / 22.1 (200 epochs).
"""

from mixjax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, res=224, method="mixup", epochs=90)
  if a.epochs not in (90, 200):
    raise ValueError(f"epochs must be 90 or 200 (the paper's schedules), got {a.epochs}.")
  c = config_utils.base_config()
  c.method = a.method
  c.mix.alpha = 0.2
  c.mix.lam_scope = "batch"  # The paper draws one lam per minibatch.
  c.model.name = "resnet50"
  c.model.dtype = "bfloat16"
  c.dataset.name = "tfds"
  c.dataset.tfds_name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.num_classes = 1000
  c.dataset.input_shape = (a.res, a.res, 3)
  c.dataset.augment = "inception"
  c.dataset.normalize = "imagenet"
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.num_epochs = float(a.epochs)
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.4          # 0.1 * 1024 / 256.
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "piecewise"
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_init = 0.25  # From 0.1 to 0.4.
  c.schedule.boundaries_epochs = (30, 60, 80) if a.epochs == 90 else (60, 120, 180)
  c.schedule.decay_factor = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  return c
