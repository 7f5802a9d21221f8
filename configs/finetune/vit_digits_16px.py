"""Fine-tune a configs/vit_digits.py checkpoint at a new resolution (16 px).

The CPU-sized counterpart of the 224 -> 384 px fine-tuning of the paper
configs in this directory: the ViT-mu/2 trained 800 steps on 8x8 digits
(17 tokens) continues at 16x16 (the digits upsampled; 65 tokens), its
position embeddings resized bilinearly from a 4x4 to an 8x8 grid (class
token kept), head and everything else loaded. 200 steps at a peak learning
rate of 1e-3 (the digits recipe trains from scratch at 3e-3), otherwise the
digits recipe.

  python main.py --config=configs/vit_digits.py --workdir=/tmp/vit_digits
  python main.py --config=configs/finetune/vit_digits_16px.py \
    --workdir=/tmp/vit_digits_16px

(`--config.init_from.path=...` for another source workdir,
`--config.init_from.path=''` for the same run from scratch.) Expected: about
1.5 minutes on 2 CPU cores; test accuracy in the README's fine-tuning table,
against the same 200 steps from scratch.
"""

from vmoe.recipes import common

SOURCE = '/tmp/vit_digits'  # workdir of configs/vit_digits.py


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.preprocess.image_size = 16
  config.num_train_steps = 200
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 100
  config.schedule.warmup_fraction = 0.1  # 20 of 200 steps
  config.optimizer.learning_rate = 1e-3
  config.init_from.path = SOURCE
  return config
