"""scikit-learn digits (8x8, shipped with scikit-learn): what mixup buys over ERM, in minutes on a CPU.

    python train.py                                  # ERM and mixup, 3 seeds, one summary table
    python train.py --config configs/digits.py:seeds=1 --config.study.corrupted_labels=0
    python train.py --config configs/digits.py --config.method=untied+amp
"""

from mixjax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, steps=1500, seeds=3)
  c = config_utils.base_config()
  c.method = "erm,mixup"
  c.mix.alpha = 0.4
  c.model.name = "digits_cnn"
  c.dataset.name = "digits"
  c.dataset.num_classes = 10
  c.dataset.input_shape = (8, 8, 1)
  c.batch_size = 64
  c.eval_batch_size = 359
  c.total_steps = a.steps
  c.optimizer.name = "adamw"
  c.optimizer.lr = 3e-3
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 50
  c.schedule.end_factor = 1e-2
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  # What mixup buys (Zhang et al. 2018): accuracy, calibration (NLL, ECE), FGSM
  # robustness and robustness to corrupted labels, over 3 seeds.
  c.study.seeds = a.seeds
  c.study.fgsm_eps = 0.05
  c.study.corrupted_labels = 0.2
  return c
