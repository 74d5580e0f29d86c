"""ViT-B/16 on ImageNet, the MixupE recipe (Table 3 of mixupe_directional_derivative).

224x224, 100K steps at global batch 4096, linear warm-up from 0 (5 epochs;
length not given in the paper) then cosine to peak/1000, AdamW b1=0.9 b2=0.99
at peak 1e-3, weight decay 0.3 (not on norms/biases), Polyak EMA 0.999, bf16
compute, mixup alpha 0.4, MixupE eta 5e-4. Paper top-1: 79.1 / 79.7 / 80.4
(ERM / mixup / MixupE). Gradient clipping at global norm 1 (common for ViT;
not stated in the paper; set optimizer.grad_clip_norm=0 to disable).
"""

from mixjax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, res=224, method="mixup", batch=4096, steps=100_000)
  c = config_utils.base_config()
  c.method = a.method
  c.mix.alpha = 0.4
  c.mixupe.eta = 5e-4
  c.model.name = "vit_b16"
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
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.3
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.end_factor = 1e-3
  c.ema_decay = 0.999
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  return c
