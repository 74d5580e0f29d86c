"""kim_cnn on sst2 with AMP (amp_adversarial_mixing_policy, section 4).

See configs/_text.py for the recipe and the data format. `:point=sent` mixes
the sentence representation instead of the word embeddings.
    python train.py --config configs/sst2_cnn.py --workdir w --config.method=amp
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _text  # noqa: E402

from mixjax import config_utils  # noqa: E402

# Submodule paths of the model's word embeddings and sentence representation.
POINTS = {"word": "embed", "sent": "sentence"}


def get_config(arg=None):
  a = config_utils.parse_arg(arg, method="amp", point="word")
  if a.point not in POINTS:
    raise ValueError(f"point must be one of {sorted(POINTS)}, got {a.point!r}.")
  return _text.text_config("sst2", "kim_cnn", a.method, POINTS[a.point])
