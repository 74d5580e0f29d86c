"""Reproductions of the mixup papers' analyses, one module per experiment.

Each runs as `python -m mixjax.experiments.<name> [--quick] [--out DIR]` and
writes a Markdown table (`<name>.md`) and PNG figures into DIR; `--quick` is
a CPU-minutes version (small models, few steps) that the test suite runs.

- `twomoons`: the quadratic approximation of the mixup loss along training
  (Zhang et al. 2021, Figure 2).
- `robustness`: FGSM / I-FGSM, white-box and black-box (mixup paper, Table 3).
- `corrupted_labels`: memorisation of corrupted labels (mixup paper, Table 2).
- `gan`: mixup GAN on 2-D toy data (mixup paper, Figure 5).
- `inbetween`: misses and gradient norms between training points (Figure 2).
- `ablations`: the mixup paper's ablation study (Table 5).
- `tabular`: the 2x128 MLP on small UCI tables (Table 4; MixupE Table 4).

Models come from `mixjax.models`, steps from `mixjax.train_step` (looped by `training.fit`);
`common` holds the command line, reports and figures, `data` the datasets.
"""
