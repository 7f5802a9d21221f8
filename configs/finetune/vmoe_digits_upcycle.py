"""Sparse upcycling of a configs/vit_digits.py checkpoint into a V-MoE.

Sparse Upcycling (Komatsuzaki et al., ICLR 2023): the dense ViT-mu/2 trained
800 steps becomes the V-MoE of configs/vmoe_b16_digits.py (token choice, 8
experts on every odd block, k=2, BPR, groups of 4 images, capacity factor
1.05), every expert a copy of its block's dense MLP, routers freshly
initialised, with combine weights renormalised over the k experts so that,
as long as no token is dropped, the upcycled model starts as the dense one
(see vmoe/checkpoints/upcycle.py). 200 steps at peak learning rate 1e-3.

  python main.py --config=configs/vit_digits.py --workdir=/tmp/vit_digits
  python main.py --config=configs/finetune/vmoe_digits_upcycle.py \
    --workdir=/tmp/vmoe_digits_upcycle

(`--config.init_from.path=''` trains the same V-MoE from scratch.) Expected:
about 1.5 minutes on 2 CPU cores; test accuracy in the README's fine-tuning
table, against the same V-MoE trained 200 steps from scratch.
"""

from vmoe.recipes import common

SOURCE = '/tmp/vit_digits'  # workdir of configs/vit_digits.py


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.moe = common.moe_config(
      layers='every:2', router='token_choice', num_experts=8, k=2,
      group_size=4 * 17, capacity_factor=1.05, batch_priority=True,
      noise_std=1 / 8, renormalize_gates=True, importance_loss_weight=0.005,
      load_loss_weight=0.005)
  config.num_train_steps = 200
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 100
  config.schedule.warmup_fraction = 0.1  # 20 of 200 steps
  config.optimizer.learning_rate = 1e-3
  config.init_from.path = SOURCE
  config.init_from.upcycle = True
  return config
