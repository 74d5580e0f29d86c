"""PreActResNet-18 on cifar100 (TFDS), 200 epochs.

Paper (mixup, PreActResNet-18) test error: ERM 25.6 / mixup 21.1; Untied MixUp (table 2, CE):
B(0.9,0.9) 22.020% vs U(B(1.4,0.7)) 21.884%.
`:paper=mixup|untied|mixupe` picks the paper's setup (see mixjax/recipes.py);
e.g. Untied MixUp with negative-cosine loss and the paper's policy for it, U(B(1.3, 0.9))
(table 2, uMixUp-NC):
    python train.py --config configs/cifar100_preactresnet18.py:paper=untied --workdir w \
        --config.method=untied --config.mix.alpha=1.3 --config.mix.beta=0.9 --config.mix.loss=cosine
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, paper="mixup", method="mixup")
  return recipes.image_config("cifar100", "preact_resnet18", a.paper, a.method)
