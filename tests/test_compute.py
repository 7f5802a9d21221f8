"""vmoe.analysis.compute: applications per token with shared experts, and
the FLOP-ratio label of a comparison."""

import math

from flax import nnx
import pytest

from vmoe.analysis import compute
from vmoe.analysis import runs
from vmoe.nn import moe
from vmoe.nn import vit


def _apps(name):
  cfg = runs.study_configs()[name]
  model = nnx.eval_shape(lambda: vit.create_model(
      cfg.model, num_classes=10, image_size=cfg.preprocess.image_size,
      num_channels=cfg.preprocess.num_channels, rngs=nnx.Rngs(0)))
  tokens = vit.num_tokens(cfg.model, cfg.preprocess.image_size)
  return {compute.applications_per_token(layer, tokens)
          for layer in moe.moe_layers(model).values()}


def test_a_shared_expert_counts_as_an_application():
  assert _apps('tc_k1_bpr') == {1.0}
  assert _apps('tc_k1_bpr_shared1') == {2.0}  # top-1 + one shared: budget 2
  assert _apps('tc_k2_bpr') == {2.0}


def test_flop_ratio_labels():
  assert compute.flop_ratio(3.05, 2.38)[1] == 'unmatched FLOPs: 1.28x'
  ratio, label = compute.flop_ratio(2.40, 2.38)
  assert ratio == pytest.approx(2.40 / 2.38) and label.startswith('matched')
  assert math.isnan(compute.flop_ratio(1.0, float('nan'))[0])
