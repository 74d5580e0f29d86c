"""kim_cnn on trec with AMP (amp_adversarial_mixing_policy, section 4).

See `mixjax.recipes.text_config` for the recipe and the data format. `:point=sent` mixes
the sentence representation instead of the word embeddings.
    python train.py --config configs/trec_cnn.py --workdir w --config.method=amp
"""

from mixjax import config_utils
from mixjax import recipes


def get_config(arg=None):
  a = config_utils.parse_arg(arg, method="amp", point="word")
  return recipes.text_config("trec", "kim_cnn", a.method, recipes.text_point(a.point))
