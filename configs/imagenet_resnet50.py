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

from mixjax import recipes


def get_config(arg=None):
  c = recipes.mixupe_imagenet(arg, "resnet50", alpha=0.2, eta=1e-3)
  c.optimizer.name = "sgd"
  c.optimizer.lr = 1.6
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  return c
