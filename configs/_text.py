"""Shared settings of the AMP text recipes (not a config itself)."""

from mixjax import config_utils


def text_config(dataset: str, model: str, method: str, point: str):
  """AMP (amp_adversarial_mixing_policy) text setups.

  Adam lr 2e-4, batch 50, 8k steps, 300-d randomly initialised embeddings,
  alpha 1, AMP eps 0.002. Mixing at `point`: the word embeddings ('Word') or
  the sentence representation ('Sent'), as submodule paths of the model.
  TREC (6 coarse classes) is not in TFDS: put `train.tsv` / `test.tsv`
  ('label<TAB>question' lines) in `dataset.data_dir`. SST-2 comes from TFDS
  'glue/sst2' (eval on its validation split) or the same TSV format.
  """
  c = config_utils.base_config()
  c.method = method
  c.mix.alpha = 1.0
  c.mix.point = point
  c.amp.eps = 0.002
  c.model.name = model
  if dataset == "trec":
    c.dataset.name = "tsv"
    c.dataset.data_dir = "data/trec"
    c.dataset.num_classes = 6
    c.dataset.input_shape = (40,)
  else:
    c.dataset.name = "tfds"
    c.dataset.tfds_name = "glue/sst2"
    c.dataset.eval_split = "validation"
    c.dataset.num_classes = 2
    c.dataset.input_shape = (64,)
  c.dataset.input_dtype = "int32"
  c.dataset.vocab_size = 20000
  c.batch_size = 50
  c.eval_batch_size = 500
  c.total_steps = 8000
  c.optimizer.name = "adam"
  c.optimizer.lr = 2e-4
  c.schedule.name = "constant"
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 2000
  return c
