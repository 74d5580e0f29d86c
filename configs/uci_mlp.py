"""MLP (2 x 128, ReLU) on UCI tables (mixup_beyond_erm 3.6; mixupe section 4.2).

mixup paper: Adam (default lr 1e-3), batch 16, 10 epochs. `:paper=mixupe`:
batch 100, 25 epochs. The default dataset is UCI Iris, shipped with
scikit-learn (works offline). Other UCI tables (Abalone, Arcene, Arrhythmia,
Htru2, Phishing): convert to `{data_dir}/train.npz`, `{data_dir}/test.npz`
with float features `x` (N, D; categorical columns one-hot, missing values
filled with the mean/mode) and int labels `y`, then
    --config.dataset.name=npz --config.dataset.data_dir=DIR \
    --config.dataset.input_shape='(D,)' --config.dataset.num_classes=C
"""

from mixjax import config_utils


def get_config(arg=None):
  a = config_utils.parse_arg(arg, method="mixup", paper="mixup")
  c = config_utils.base_config()
  c.method = a.method
  c.mix.alpha = 1.0
  c.mixupe.eta = 1e-4
  c.model.name = "mlp"
  c.dataset.name = "iris"
  c.dataset.num_classes = 3
  c.dataset.input_shape = (4,)
  c.dataset.normalize = "per_dataset"
  if a.paper == "mixup":
    c.batch_size, c.num_epochs = 16, 10.0
  elif a.paper == "mixupe":
    c.batch_size, c.num_epochs = 100, 25.0
  else:
    raise ValueError(f"paper must be mixup or mixupe, got {a.paper!r}.")
  c.eval_batch_size = 100
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.schedule.name = "constant"
  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000
  return c
