"""Shared settings of the MixupE ImageNet recipe (Table 3; not a config itself)."""

from mixjax import config_utils


def mixupe_imagenet(arg, model: str, alpha: float, eta: float):
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


def adamw(c, weight_decay: float):
  """AdamW at peak 1e-3, b1 = 0.9, b2 = 0.99 (ViT-B/16, CoAtNet-0)."""
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = weight_decay
  return c
