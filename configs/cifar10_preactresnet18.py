"""PreActResNet-18 on cifar10 (TFDS), 200 epochs.

Paper (mixup, PreActResNet-18, 200 epochs) test error: ERM 5.6 / mixup 4.2; Untied MixUp
(table 1, CE): mixup B(0.9,0.9) 4.199% vs U(B(2.2,0.9)) 4.177%.
`:paper=mixup|untied|mixupe` picks the paper's setup (see mixjax/recipes.py);
e.g. Untied MixUp with negative-cosine loss and the paper's policy for it, U(B(1.8, 1.0))
(table 1, uMixUp-NC):
    python train.py --config configs/cifar10_preactresnet18.py:paper=untied --workdir w \
        --config.method=untied --config.mix.alpha=1.8 --config.mix.beta=1.0 --config.mix.loss=cosine
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, paper="mixup", method="mixup")
  return recipes.image_config("cifar10", "preact_resnet18", a.paper, a.method)
