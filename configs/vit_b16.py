"""Dense ViT-B/16 on ImageNet-1k (ILSVRC2012), the baseline of the B/16 MoEs.

Reproduces: ViT-B/16 trained from scratch on ImageNet-1k with big_vision's
recipe (big_vision/configs/vit_i1k.py; "How to train your ViT", Steiner et
al. 2022): AugReg preset medium2 (RandAugment(2, 15), mixup 0.5; big_vision's
default for B/16 on ImageNet-1k), no dropout or stochastic depth (as that
config), 300 epochs at batch 4096, Adam with bf16 first moment, lr 1e-3,
weight decay 0.1 on kernels (big_vision's 1e-4 after the learning rate),
10k warmup steps, cosine decay, sigmoid cross-entropy, eval at resize 256 +
central crop 224 (`common.imagenet_recipe`). big_vision reports ~79% top-1
for this setting.

  python main.py --config=configs/vit_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost: 86.6M parameters, 35 GFLOPs per image (forward).
Needs `imagenet2012` prepared in data_dir (manual download, see README).
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = 'B/16'
  return config
