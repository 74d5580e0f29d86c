"""mixjax: the mixup family of regularizers for JAX and Flax.

The light modules (sampling, policies, mixing, losses, objectives, AMP, MixupE, ...) are imported
with the package. The heavier ones in `_LAZY_SUBMODULES` (models, the train step, optimizers, input
pipelines, checkpointing, sharding) are imported on first attribute access, so `import mixjax`
stays fast and imports neither TensorFlow nor orbax: `mixjax.models.get_model(...)` just works.
"""

import importlib as _importlib
import types as _types

from mixjax import about
from mixjax import adapters
from mixjax import amp
from mixjax import attacks
from mixjax import checks
from mixjax import hidden
from mixjax import losses
from mixjax import methods
from mixjax import mixing
from mixjax import mixupe
from mixjax import objectives
from mixjax import pairing
from mixjax import policies
from mixjax import sampling
from mixjax import theory
from mixjax.hidden import mix_at, module_paths, nnx_mix_at
from mixjax.losses import (class_embeddings, mixup_loss, negative_cosine, sigmoid_cross_entropy,
                           softmax_cross_entropy)
from mixjax.mixing import MixedBatch, mix, mix_batch, mix_dirichlet, mix_with_partner, to_targets
from mixjax.methods import get_objective
from mixjax.adapters import MixSpec, make_apply, make_apply_fn, make_nnx_apply
from mixjax.policies import Coefficients
from mixjax.sampling import (expected_one_minus_lam, expected_sq_one_minus_lam, sample_beta,
                             sample_dirichlet, sample_untied, untied_gamma)

__version__ = "0.1.0"

# Submodules imported on first access of `mixjax.<name>` (an immutable set). Once imported, the
# submodule is an attribute of the package and `__getattr__` is not called for it again.
_LAZY_SUBMODULES = frozenset({
    "checkpointing", "cli", "compilation_cache", "config_utils", "evaluation", "experiments",
    "from_config", "input_pipeline", "metrics_writer", "models", "optim", "preemption", "recipes",
    "sharding", "study", "train_step",
})


def __getattr__(name: str) -> _types.ModuleType:
  """Imports the lazy submodule `mixjax.<name>` on first access (PEP 562)."""
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  """The package's attributes, the not-yet-imported lazy submodules included."""
  return sorted(set(globals()) | _LAZY_SUBMODULES)
