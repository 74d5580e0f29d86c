"""CoAtNet-0 on ImageNet, the MixupE recipe (Table 3 of mixupe_directional_derivative).

224x224, 100K steps at global batch 4096, linear warm-up from 0 (5 epochs;
length not given in the paper) then cosine to peak/1000, AdamW b1=0.9 b2=0.99
at peak 1e-3, weight decay 0.05 (not on norms/biases), batch norm over the
global batch, Polyak EMA 0.999 of params and batch statistics, bf16 compute,
mixup alpha 0.4, MixupE eta 5e-4. Paper top-1: 79.8 / 80.8 / 81.6.
"""

from mixjax import recipes


def get_config(arg=None):
  return recipes.adamw(recipes.mixupe_imagenet(arg, "coatnet0", alpha=0.4, eta=5e-4), 0.05)
