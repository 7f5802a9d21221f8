"""Shared settings of the router comparison configs (`configs/routers/`).

Naming: `<router>_<budget>[_<variant>]_<data>.py` with router `tc` (softmax
token choice), `ec` (softmax expert choice), `soft` (Soft MoE),
`sinkhorn_tc`, `sinkhorn_ec`, `sparse_ec` (sparsity-constrained expert
choice), `mh_tc` (Multi-Head MoE over token choice); budget `k1` / `k2`
(experts per token) or `cf1` / `cf2` (expert choice capacity factor: slots
per token); variants `bpr` (Batch Priority Routing), `shared1` (one shared
expert), `fine2` (granularity 2), `entropy` (LIMoE's entropy losses instead
of the importance and load losses), `noaux` (no auxiliary loss), `eom` /
`fom` (expert / final output masking); data `digits`, `s16`, `b16`
(ImageNet-1k). `dense_digits.py` is the baseline. Units beyond the MLP
routers, with dense MLPs: `dense_h4` / `moh_h4_k2` / `gated_h4` (4 heads:
standard, mixture-of-head with 1 shared + top-2 routed heads, sigmoid-gated
heads), `mod_c50` (mixture-of-depths, 50% capacity), `mone_e4_b50` (4
nested experts, budget 0.5).

Digits (`digits`): the `common.digits_recipe` ViT-mu/2 (800 steps of 128
images), blocks 1 and 3 MoE layers with 8 experts, routing groups of 4 images
(68 tokens). Budget 2 = 2 expert MLP applications per token in every MoE
layer (e * c = 136 slots per group of 68 tokens for every router; the shared
expert counts as one), budget 1 = 1 (72 slots: c = ceil(68 / 8) = 9).
Router noise and auxiliary losses are the library defaults: noise 1/e for
the gate routers (none for `sparse_ec`), importance + load losses (0.005
each) for softmax and Sinkhorn token choice; the other routers add only the
z-loss (weight 0).

ImageNet (`s16`, `b16`): ViT-S/16 or B/16 whose second-half blocks (6-11)
are MoE layers with 32 experts, one image per routing group (197 tokens),
budget 1 (c = ceil(197 / 32) = 7 slots per expert), with the
`common.imagenet_recipe` (big_vision's ImageNet-1k ViT recipe with the
AugReg preset medium2, 300 epochs at batch 4096).
"""

from vmoe.recipes import common

DIGITS_GROUP = 4 * 17   # 4 images of 16 patches + class token
DIGITS_EXPERTS = 8
IMAGENET_EXPERTS = 32


def digits(**moe):
  """The digits recipe; `moe` = MoE options (none: the dense baseline)."""
  config = common.digits_recipe(common.get_base_config())
  if moe:
    config.model.moe = common.moe_config(
        layers='every:2', num_experts=DIGITS_EXPERTS, group_size=DIGITS_GROUP,
        **moe)
  return config


def digits_kinds(*, num_heads: int | None = None, attention: str = 'mha',
                 block: str = 'standard', attention_options=None,
                 block_options=None, **moe):
  """`digits(**moe)` with another attention / block kind (options as dicts
  of `model.attention_options` / `model.block_options` overrides) and
  `num_heads` heads (None: the variant's 2)."""
  config = digits(**moe)
  config.model.num_heads = num_heads
  config.model.attention = attention
  config.model.attention_options.update(attention_options or {})
  config.model.block = block
  config.model.block_options.update(block_options or {})
  return config


def imagenet(variant: str, **moe):
  """ViT-{S,B}/16 on ImageNet-1k, 32 experts in blocks 6-11, groups of one
  image."""
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = variant
  config.model.moe = common.moe_config(
      layers='second_half', num_experts=IMAGENET_EXPERTS, group_size=197,
      **moe)
  return config
