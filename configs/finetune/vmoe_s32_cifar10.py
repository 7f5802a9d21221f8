r"""The released V-MoE-S/32 (ILSVRC2012) fine-tuned on cifar10 at 384 px.

Reproduces: the V-MoE paper's transfer of V-MoE-S/32 with 8 experts on the
last two odd blocks, k=2 (Riquelme et al. 2021; the checkpoint
gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1, 300 epochs on
ILSVRC2012 with RandAugment), with the ViT transfer protocol of
configs/finetune/recipe.py (SGD momentum 0.9, batch 512, lr 0.003, cosine,
10k steps (500 warmup), no weight decay, a new zero-initialised head)
and the MoE settings of vmoe's own fine-tuning configs: capacity factor 1.5,
no Batch Priority Routing in training, router noise 1/E, importance and load
losses 0.005, gradient clipping at 10, tokens rounded to bfloat16 around the
experts (vmoe's dispatcher.bfloat16), routing groups of 8 images.

The paper's "S" is not ViT-S: width 512, 8 blocks, MLP 2048, 8 heads (MoE
blocks 5 and 7). The checkpoint's pre_logits layer goes with its head (as
vmoe's fine-tuning does); position embeddings are resized from 7x7 to 12x12.
Download the checkpoint (an index and data shards) and prepare the dataset:

  gsutil -m cp 'gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1*' ~/checkpoints/
  tfds build cifar10 --data_dir=/data/tfds

  python main.py --config=configs/finetune/vmoe_s32_cifar10.py \
    --config.dataset.data_dir=/data/tfds --workdir=/tmp/vmoe_s32_cifar10

Cost: 32 GFLOPs per training image (3x the 10.6 GFLOPs forward pass at 145
tokens, `--config.dry_run=True`; 56.8M parameters, 31.6M active per token),
i.e. 1.6e17 FLOPs for the 5.1M training images of the run, minutes of compute
on 8 A100s. Expected test accuracy: not measured here (no accelerator).
"""

from vmoe.recipes import common
from vmoe.recipes import finetune as recipe

CHECKPOINT = '~/checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1'


def get_config():
  config = common.get_base_config()
  config.model.variant = 'S/32'
  config.model.width, config.model.depth = 512, 8
  config.model.mlp_dim, config.model.num_heads = 2048, 8
  tokens = (384 // 32) ** 2 + 1
  config.model.moe = common.moe_config(
      layers=(5, 7), router='token_choice', num_experts=8, k=2,
      group_size=8 * tokens, capacity_factor=1.5, batch_priority=False,
      noise_std=1 / 8, importance_loss_weight=0.005, load_loss_weight=0.005,
      bf16_dispatch=True)
  config = recipe.transfer(config, 'cifar10', checkpoint=CHECKPOINT)
  config.optimizer.grad_clip_norm = 10.0
  return config
