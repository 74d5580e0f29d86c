"""mixjax: the mixup family of regularizers for JAX and Flax."""

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
