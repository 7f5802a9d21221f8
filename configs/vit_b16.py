"""Dense ViT-B/16 on ImageNet-1k (ILSVRC2012), the baseline of the B/16 MoEs.

Reproduces: ViT-B/16 trained from scratch on ImageNet-1k with the "How to
train your ViT" (Steiner et al. 2022) light regularisation (dropout 0.1,
stochastic depth 0.1, mixup 0.2), 300 epochs at batch 4096, AdamW lr 1e-3,
wd 1e-4, 10k warmup steps, cosine decay. RandAugment is not part of this
pipeline, so expect a point or two below the paper's ~79% top-1.

  python main.py --config=configs/vit_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost: 86.6M parameters, 35 GFLOPs per image (forward).
Needs `imagenet2012` prepared in data_dir (manual download, see README).
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config())
  config.model.variant = 'B/16'
  config.model.dropout = 0.1
  config.model.stochastic_depth = 0.1
  return config
