"""ResNet-50 on ImageNet, the MixupE recipe (Table 3 of mixupe_directional_derivative).

224x224 Inception crops, 100K steps at global batch 4096, linear warm-up from 0
(5 epochs; the paper does not give the length) then cosine decay to peak/1000,
SGD + momentum 0.9 at peak lr 1.6, weight decay 1e-4 (not on batch-norm
parameters or biases), batch norm over the global batch, Polyak EMA 0.999 of
params and batch statistics, bf16 compute, mixup alpha 0.2, MixupE eta 1e-3.
Paper top-1: 76.2 (ERM) / 77.2 (mixup) / 77.7 (MixupE).

    python train.py --config configs/imagenet_resnet50.py --workdir w --config.method=mixup+mixupe
    python train.py --config configs/imagenet_resnet50.py:res=64 --config.dataset.name=synthetic
"""

from mixjax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, res=224, method="mixup", batch=4096, steps=100_000)
  c = config_utils.base_config()
  c.method = a.method
  c.mix.alpha = 0.2
  c.mixupe.eta = 1e-3
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
  c.batch_size = a.batch
  c.eval_batch_size = 1024
  c.total_steps = a.steps
  c.optimizer.name = "sgd"
  c.optimizer.lr = 1.6
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.end_factor = 1e-3
  c.ema_decay = 0.999
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  return c
