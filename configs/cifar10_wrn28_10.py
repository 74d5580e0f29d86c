"""WideResNet-28-10 on CIFAR-10 (mixup_beyond_erm, section 3.2).

200 epochs, batch 128, SGD momentum 0.9 lr 0.1 divided by 10 after epochs
60, 120, 180 (the paper's WRN schedule), weight decay 1e-4, alpha 1.
Paper test error: ERM 3.8 / mixup 2.7.
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, paper="mixup", method="mixup")
  c = recipes.image_config("cifar10", "wrn28_10", a.paper, a.method)
  if a.paper == "mixup":
    c.schedule.boundaries_epochs = (60, 120, 180)
  return c
