"""WideResNet-16-8 on SVHN (theory paper, appendix C.1): mixup Beta(5, 0.5) vs ERM.

The paper gives the model and policy only; training follows the MixupE
paper's SVHN setup (SGD 0.1, momentum 0.9, weight decay 1e-4, batch 100,
200 epochs, lr / 10 at 100 and 150). FGSM robustness is evaluated separately
on 1000 test images.
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, method="mixup")
  c = recipes.image_config("svhn", "wrn16_8", "mixupe", a.method)
  c.mix.alpha = 5.0
  c.mix.beta = 0.5
  c.dataset.augment = "none"  # No flips for digits.
  return c
