"""Shared experiment recipes that the config files in `configs/` build on.

  common     `get_base_config()` (every field a run reads, with its default),
             data presets (digits, ImageNet) and training recipes
  routers    the router-comparison settings of `configs/routers/`
  finetune   the transfer protocol of `configs/finetune/`

Config files are loaded by path (`--config=configs/vit_digits.py`) and are
not a package; what several of them share lives here.
"""
