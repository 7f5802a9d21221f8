r"""The AugReg ViT-B/16 (ImageNet-21k) fine-tuned on cifar10 at 384 px.

Reproduces: the transfer protocol of the ViT paper (Dosovitskiy et al. 2021,
App. B.1.1) with the recommended AugReg checkpoint (Steiner et al. 2021, "How
to train your ViT?"; big_vision's 'howto-i21k-B/16'), see
configs/finetune/recipe.py: SGD momentum 0.9, batch 512, lr 0.003, cosine,
10k steps (500 warmup), clip 1, no weight decay, a new zero-initialised
head. Position embeddings are resized from 14x14 to 24x24 (bilinear, class
token kept).

Download the checkpoint (330 MB) and prepare the dataset once:

  gsutil cp gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz ~/checkpoints/
  tfds build cifar10 --data_dir=/data/tfds

  python main.py --config=configs/finetune/vit_b16_cifar10.py \
    --config.dataset.data_dir=/data/tfds --workdir=/tmp/vit_b16_cifar10

Cost: 335 GFLOPs per training image (3x the 111.7 GFLOPs forward pass at 577
tokens, `--config.dry_run=True`; 86.9M parameters), i.e. 1.7e18 FLOPs for the
5.1M training images of the run, about 30 minutes on 8 A100s at 40% of their
bf16 peak. Expected test accuracy: about 99%, as published for ViT-B/16 pre-
trained on ImageNet-21k (not measured here: no accelerator).
"""

from vmoe.recipes import common
from vmoe.recipes import finetune as recipe

CHECKPOINT = ('~/checkpoints/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-'
              'do_0.0-sd_0.0.npz')


def get_config():
  config = common.get_base_config()
  config.model.variant = 'B/16'
  return recipe.transfer(config, 'cifar10', checkpoint=CHECKPOINT)
