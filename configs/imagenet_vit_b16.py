"""ViT-B/16 on ImageNet, the MixupE recipe (Table 3 of mixupe_directional_derivative).

224x224, 100K steps at global batch 4096, linear warm-up from 0 (5 epochs;
length not given in the paper) then cosine to peak/1000, AdamW b1=0.9 b2=0.99
at peak 1e-3, weight decay 0.3 (not on norms/biases), Polyak EMA 0.999, bf16
compute, mixup alpha 0.4, MixupE eta 5e-4. Paper top-1: 79.1 / 79.7 / 80.4
(ERM / mixup / MixupE). Gradient clipping at global norm 1 (common for ViT;
not stated in the paper; set optimizer.grad_clip_norm=0 to disable).
"""

from mixjax import recipes


def get_config(arg=None):
  c = recipes.adamw(recipes.mixupe_imagenet(arg, "vit_b16", alpha=0.4, eta=5e-4), 0.3)
  c.optimizer.grad_clip_norm = 1.0
  return c
