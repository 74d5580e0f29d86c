"""PreActResNet-18 on mnist (TFDS), 200 epochs.

Untied MixUp paper table 3 (PreActResNet-18, 200 epochs, CE and negative-cosine losses).
`:paper=mixup|untied|mixupe` picks the paper's setup (see mixjax/recipes.py);
e.g. Untied MixUp with negative-cosine loss and the paper's policy for it, U(B(1.3, 0.9))
(table 3, uMixUp-NC):
    python train.py --config configs/mnist_preactresnet18.py:paper=untied --workdir w \
        --config.method=untied --config.mix.alpha=1.3 --config.mix.beta=0.9 --config.mix.loss=cosine
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, paper="untied", method="mixup")
  return recipes.image_config("mnist", "preact_resnet18", a.paper, a.method)
