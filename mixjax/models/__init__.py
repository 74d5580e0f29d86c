"""The model zoo: linen modules named by string, each exposing its mixing points.

    model = get_model("resnet50", num_classes=1000, dtype=jnp.bfloat16)
    model.mixing_points   # ('input', 'stage1', ..., 'stage4', 'pre_logits')
    with mixjax.mix_at(model.mixing_points[2], lam, perm):
      logits = model.apply(variables, x)

Every model is called as `model(x, train=False)`; batch-norm models keep the
'batch_stats' collection; dropout draws from the 'dropout' rng. Keyword
arguments override the named configuration (e.g. `width=16` for a narrow
ResNet, `depth=2` for a shallow ViT); common ones are `num_classes`,
`dtype` (compute dtype; parameters stay float32), `head` ('logits' or
'cosine' with `embed_dim`) and `axis_name` (batch-norm statistics over a
named batch axis inside shard_map/pmap).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from mixjax.models import coatnet, digits, layers, mlp, preact_resnet, resnet, speech, text
from mixjax.models import vit, wide_resnet
from mixjax.models.coatnet import CoAtNet
from mixjax.models.digits import DigitsCNN
from mixjax.models.layers import Point
from mixjax.models.mlp import MLP, GanDiscriminator, GanGenerator
from mixjax.models.preact_resnet import PreActResNet, SmallPreActResNet
from mixjax.models.resnet import ResNet
from mixjax.models.speech import VGG, LeNet
from mixjax.models.text import BiLSTMAttention, KimCNN
from mixjax.models.vit import ViT
from mixjax.models.wide_resnet import WideResNet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its constructor and the input it is built for.

  `input_shape` is one example's shape (no batch axis) and `input_dtype` its
  dtype: the size of the paper setup (e.g. (224, 224, 3) for ImageNet models).
  """
  build: Callable[..., nn.Module]
  input_shape: tuple[int, ...]
  input_dtype: Any = jnp.float32
  description: str = ""


_IMAGENET = (224, 224, 3)
_CIFAR = (32, 32, 3)
_SPEECH = (160, 101, 1)

_REGISTRY: dict[str, ModelSpec] = {}
for _d in (18, 34, 50, 101, 152):
  _REGISTRY[f"resnet{_d}"] = ModelSpec(functools.partial(resnet.resnet, _d), _IMAGENET,
                                       description=f"ResNet-{_d} v1.5 (ImageNet)")
for _d in (18, 34, 50, 101):
  _REGISTRY[f"preact_resnet{_d}"] = ModelSpec(
      functools.partial(preact_resnet.preact_resnet, _d), _CIFAR,
      description=f"PreActResNet-{_d} (CIFAR stem)")
_REGISTRY["preact_resnet_small"] = ModelSpec(
    SmallPreActResNet, (8, 8, 1),
    description="small pre-activation ResNet, 4 one-block stages, no BN (conv or dense)")
_REGISTRY["wrn28_10"] = ModelSpec(functools.partial(WideResNet, depth=28, widen_factor=10),
                                  _CIFAR, description="Wide ResNet 28-10")
_REGISTRY["wrn16_8"] = ModelSpec(functools.partial(WideResNet, depth=16, widen_factor=8),
                                 _CIFAR, description="Wide ResNet 16-8")
for _v in vit.VARIANTS:
  _REGISTRY["vit_" + _v.replace("/", "").lower()] = ModelSpec(
      functools.partial(vit.vit, _v), _IMAGENET, description=f"ViT-{_v}")
for _v in coatnet.VARIANTS:
  _REGISTRY[f"coatnet{_v}"] = ModelSpec(functools.partial(coatnet.coatnet, _v), _IMAGENET,
                                        description=f"CoAtNet-{_v}")
_REGISTRY["mlp"] = ModelSpec(MLP, (4,), description="MLP 2 x 128 ReLU (UCI; default: Iris)")
_REGISTRY["lenet"] = ModelSpec(LeNet, _SPEECH, description="LeNet for 160x101 spectrograms")
_REGISTRY["vgg11"] = ModelSpec(functools.partial(VGG, depth=11), _SPEECH,
                               description="VGG-11 (BN) for 160x101 spectrograms")
_REGISTRY["vgg13"] = ModelSpec(functools.partial(VGG, depth=13), _SPEECH,
                               description="VGG-13 (BN) for 160x101 spectrograms")
_REGISTRY["kim_cnn"] = ModelSpec(KimCNN, (64,), jnp.int32,
                                 description="Kim's CNN over word embeddings")
_REGISTRY["bilstm_attention"] = ModelSpec(BiLSTMAttention, (64,), jnp.int32,
                                          description="BiLSTM (1024) with attention")
_REGISTRY["gan_generator"] = ModelSpec(GanGenerator, (2,),
                                       description="mixup-GAN generator, 3 x 512 ReLU")
_REGISTRY["gan_discriminator"] = ModelSpec(GanDiscriminator, (2,),
                                           description="mixup-GAN discriminator, 3 x 512 ReLU")
_REGISTRY["digits_cnn"] = ModelSpec(DigitsCNN, (8, 8, 1),
                                    description="small CNN for 8x8 sklearn digits")
del _d, _v


def list_models() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
  """The `ModelSpec` of `name`; ValueError listing the names for an unknown one."""
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"Unknown model name {name!r}; available models: {', '.join(list_models())}.")
  return _REGISTRY[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The linen module registered as `name`, with `kwargs` overriding its configuration.

  Raises ValueError for an unknown name (listing the known ones) or a bad
  value; TypeError for a keyword the model does not take.
  """
  return model_spec(name).build(**kwargs)


__all__ = [
    "BiLSTMAttention", "CoAtNet", "DigitsCNN", "GanDiscriminator", "GanGenerator", "KimCNN",
    "LeNet", "MLP", "ModelSpec", "Point", "PreActResNet", "ResNet", "SmallPreActResNet", "VGG",
    "ViT", "WideResNet",
    "get_model", "list_models", "model_spec",
]
