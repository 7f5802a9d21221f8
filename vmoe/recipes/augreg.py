"""AugReg presets: RandAugment, mixup, dropout and stochastic depth.

"How to train your ViT? Data, Augmentation, and Regularization in Vision
Transformers" (Steiner et al. 2022, arXiv:2106.10270) trained every ViT on a
grid of augmentation presets (RandAugment and mixup together) and
regularisation (dropout and stochastic depth, 0.0 or 0.1, always set
together), with weight decay 0.1 or 0.03.

Naming: this module follows the released AugReg checkpoints
(google-research/vision_transformer, `vit_jax_augreg.ipynb`, names
`...-aug_<preset>-wd_<wd>-do_<d>-sd_<d>...`) and google-research/vmoe
(`vmoe/configs/vmoe_paper/common.py`: `get_randaug`,
`get_mixup_concentration`). big_vision's `configs/vit_i1k.py` /
`vit_i21k.py` (`RANDAUG_DEF`, `MIXUP_DEF`) name the two light presets one
higher; medium and strong agree:

  preset    RandAugment (layers, magnitude)   mixup   big_vision's name
  none      -                                 0.0     none
  light0    (2, 0)                            0.0     light1
  light1    (2, 10)                           0.2     light2
  medium1   (2, 15)                           0.2     medium1
  medium2   (2, 15)                           0.5     medium2
  strong1   (2, 20)                           0.5     strong1
  strong2   (2, 20)                           0.8     strong2

RandAugment is big_vision's / vmoe's `randaug(num_layers, magnitude)`
(`config.preprocess.randaug`): num_layers ops per image, each uniform over
16 ops, at the fixed magnitude (of 30 at most). Mixup is
`config.preprocess.mixup_alpha`, the Beta(a, a) concentration.
(RandAugment (2, 0) is not a no-op: its ops without a magnitude, e.g.
Equalize, AutoContrast, Invert, still apply.)
"""

from __future__ import annotations

import ml_collections

# preset: (RandAugment (num_layers, magnitude) or None, mixup concentration)
PRESETS = {
    'none': (None, 0.0),
    'light0': ((2, 0), 0.0),
    'light1': ((2, 10), 0.2),
    'medium1': ((2, 15), 0.2),
    'medium2': ((2, 15), 0.5),
    'strong1': ((2, 20), 0.5),
    'strong2': ((2, 20), 0.8),
}
# big_vision's names of the same presets (configs/vit_i1k.py).
BIG_VISION_NAMES = {'none': 'none', 'light0': 'light1', 'light1': 'light2',
                    'medium1': 'medium1', 'medium2': 'medium2',
                    'strong1': 'strong1', 'strong2': 'strong2'}
REGULARIZATION = (0.0, 0.1)  # dropout = stochastic depth, the AugReg grid


def augreg(config: ml_collections.ConfigDict, preset: str,
           regularization: float = 0.0) -> ml_collections.ConfigDict:
  """Sets RandAugment and mixup of `preset` (`PRESETS`) and dropout =
  stochastic depth = `regularization` (0.0 or 0.1 in the paper's grid)."""
  if preset not in PRESETS:
    raise ValueError(f'AugReg preset {preset!r} is not one of '
                     f'{sorted(PRESETS)}')
  randaug, mixup = PRESETS[preset]
  config.preprocess.randaug = randaug
  config.preprocess.mixup_alpha = mixup
  config.model.dropout = regularization
  config.model.stochastic_depth = regularization
  return config
