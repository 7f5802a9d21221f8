"""Dense ViT-mu/2 on the embedded `digits` data (8x8 grayscale, 1497/300).

Reproduces: nothing published; the CPU run of the whole stack (data, model,
optimizer, checkpoints, metrics) and the dense baseline of the `*_digits.py`
MoE configs. ViT-mu is a 4-block, width-64 ViT sized for CPUs; 8x8 images with
2x2 patches give 16 tokens + a class token.

  python main.py --config=configs/vit_digits.py --workdir=/tmp/vit_digits

Expected: test accuracy ~0.97 after 800 steps (~68 epochs), 2-3 minutes on 2
CPU cores.
"""

from vmoe.recipes import common


def get_config():
  return common.digits_recipe(common.get_base_config())
