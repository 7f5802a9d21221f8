"""The routing-analysis library: hand-computed cases on synthetic routing
traces and decisions, and every function on a tiny trained token-choice
model (trained once for the module) and a tiny Soft MoE."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import tiny_digits_config
from vmoe import analysis
from vmoe.analysis.trace import LayerTrace, Trace
from vmoe.nn import moe as moe_lib
from vmoe.nn import routing as rt
from vmoe.nn import vit

# End-to-end: trains models or runs main.py in subprocesses.
pytestmark = pytest.mark.slow

LOG3 = float(np.log(3.0))


# -- token views of hand-built decisions --------------------------------------


def test_token_view_token_choice():
  r = rt.TokenChoiceRouting(
      expert_index=jnp.array([[[0, 1], [0, 2], [1, 0]]], jnp.int32),
      position=jnp.zeros((1, 3, 2), jnp.int32),
      combine_weight=jnp.array([[[0.2, 0.3], [0.0, 0.5], [0.0, 0.0]]]),
      valid=jnp.array([[[True, True], [False, True], [False, False]]]),
      capacity=1, num_experts=3)
  v = jax.device_get(analysis.token_view(r, {'logits': jnp.zeros((1, 3, 3))}))
  np.testing.assert_array_equal(v['assigned'][0], [[1, 1, 0], [0, 0, 1],
                                                   [0, 0, 0]])
  # Token 0: both kept, expert 1 has the larger combine weight.
  np.testing.assert_array_equal(v['top_expert'][0], [1, 2, -1])
  np.testing.assert_array_equal(v['dropped'][0], [False, False, True])
  np.testing.assert_allclose(v['entropy'][0], [LOG3] * 3, rtol=1e-6)
  np.testing.assert_allclose(v['probs'][0], np.full((3, 3), 1 / 3), rtol=1e-6)


def test_token_view_expert_choice():
  # 2 experts, capacity 1: both pick token 2.
  r = rt.ExpertChoiceRouting(token_index=jnp.array([[[2], [2]]], jnp.int32),
                             combine_weight=jnp.array([[[0.4], [0.7]]]),
                             num_tokens=3)
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.25, 0.75]]]))
  v = jax.device_get(analysis.token_view(r, {'logits': logits}))
  np.testing.assert_array_equal(v['assigned'][0], [[0, 0], [0, 0], [1, 1]])
  np.testing.assert_array_equal(v['top_expert'][0], [-1, -1, 1])
  np.testing.assert_array_equal(v['dropped'][0], [True, True, False])
  h = lambda p: -sum(q * np.log(q) for q in p)  # noqa: E731
  np.testing.assert_allclose(v['entropy'][0], [h([.5, .5]), h([.9, .1]),
                                               h([.25, .75])], rtol=1e-5)


def test_token_view_soft():
  # e=2 experts x p=2 slots. Dispatch = softmax over the 2 tokens per slot:
  # token 0 weighs e^5/(e^5+1) in slot 3 (expert 1), its largest; token 1
  # weighs e^3/(e^3+1) in slot 0 (expert 0), its largest.
  logits = jnp.array([[[0., 0., 0., 5.], [3., 0., 0., 0.]]])
  v = jax.device_get(analysis.token_view(
      rt.SoftRouting(logits=logits, num_experts=2), None))
  np.testing.assert_array_equal(v['top_expert'][0], [1, 0])
  np.testing.assert_array_equal(v['assigned'][0], [[0, 1], [1, 0]])
  assert not v['dropped'].any()
  combine = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
  np.testing.assert_allclose(v['probs'][0],
                             combine.reshape(2, 2, 2).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(
      v['entropy'][0], -(combine * np.log(combine)).sum(-1), rtol=1e-6)


# -- statistics on a synthetic trace -------------------------------------------


def synthetic_trace(top_expert, labels, *, num_experts=3, entropy=None,
                    grid=(1, 2)):
  """A one-layer trace whose tokens each go to `top_expert` (-1: dropped)."""
  top = np.asarray(top_expert)
  assigned = np.zeros(top.shape + (num_experts,), bool)
  for idx in np.ndindex(top.shape):
    if top[idx] >= 0:
      assigned[idx + (top[idx],)] = True
  mass = assigned.sum(axis=1).astype(np.float32) + 0.5
  layer = LayerTrace(
      block=1, router='token_choice', num_experts=num_experts, capacity=2,
      group_size=top.shape[1], top_expert=top, assigned=assigned,
      dropped=top < 0,
      entropy=(np.zeros(top.shape, np.float32) if entropy is None
               else np.asarray(entropy, np.float32)),
      gate_mass=mass)
  labels = np.asarray(labels)
  return Trace(layers={1: layer}, labels=labels,
               logits=np.eye(max(labels) + 1)[labels].astype(np.float32),
               num_prefix_tokens=1, grid=grid)


def test_statistics_hand():
  # 2 images x 3 tokens; expert 2 never used; one token of image 1 dropped.
  trace = synthetic_trace([[0, 0, 1], [1, -1, 0]], [0, 1],
                          entropy=[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
  load = analysis.expert_load(trace)
  assert load.tokens.tolist() == [3, 2, 0]
  np.testing.assert_allclose(load.token_share, [0.6, 0.4, 0.0])
  # gate_mass per image = assignments + 0.5: [2.5, 1.5, .5] and [1.5, 1.5, .5].
  np.testing.assert_allclose(load.gate_mass, [4.0, 3.0, 1.0])
  np.testing.assert_allclose(load.gate_share, [0.5, 0.375, 0.125])
  per_image = analysis.dropped_per_image(trace)
  np.testing.assert_allclose(per_image.dropped_fraction, [0.0, 1 / 3])
  assert per_image.label.tolist() == [0, 1]
  unused = analysis.unused_experts(trace)
  assert unused.num_unused.tolist() == [1] and unused.unused[0] == (2,)
  assert analysis.unused_experts(trace, max_share=0.45).unused[0] == (1, 2)
  row = analysis.layer_summary(trace).iloc[0]
  assert row.dropped_fraction == pytest.approx(1 / 6)
  assert row.entropy == pytest.approx(0.35)
  assert row.max_entropy == pytest.approx(LOG3)
  assert (row.num_unused, row.min_share, row.max_share) == (1, 0.0, 0.6)
  shares = np.array([0.6, 0.4, 0.0])
  assert row.load_cv == pytest.approx(shares.std() / shares.mean())


def test_class_usage_and_nmi_hand():
  normalized_mutual_info_score = pytest.importorskip(
      'sklearn.metrics').normalized_mutual_info_score
  # Class 0 images use experts 0, 0, 1; class 1 images use 1, 2, 2 (and 2).
  trace = synthetic_trace([[0, 0, 1], [1, 2, 2], [-1, 2, 2]], [0, 1, 1])
  counts = analysis.class_usage(trace, 1)
  np.testing.assert_array_equal(counts, [[2, 0], [1, 1], [0, 4]])
  # The class token (position 0) left out:
  np.testing.assert_array_equal(
      analysis.class_usage(trace, 1, patches_only=True), [[1, 0], [1, 0],
                                                          [0, 4]])
  experts = [0, 0, 1, 1, 2, 2, 2, 2]
  classes = [0, 0, 0, 1, 1, 1, 1, 1]
  nmi = analysis.normalized_mutual_information(counts)
  assert nmi == pytest.approx(normalized_mutual_info_score(classes, experts))
  spec = analysis.specialization(trace).iloc[0]
  assert spec.nmi == pytest.approx(nmi)
  assert spec.top_expert_share == pytest.approx((2 / 3 + 4 / 5) / 2)
  assert analysis.normalized_mutual_information(np.eye(3) * 5) == (
      pytest.approx(1.0))
  assert analysis.normalized_mutual_information(
      np.outer([1, 2, 3], [2, 5])) == pytest.approx(0.0, abs=1e-12)
  assert analysis.normalized_mutual_information(np.ones((3, 1))) == 0.0


def test_routing_change_and_maps_hand():
  a = synthetic_trace([[0, 0, 1], [1, -1, 0]], [0, 1])
  b = synthetic_trace([[0, 2, 1], [1, -1, -1]], [0, 1])
  change = analysis.routing_change(a, b).iloc[0]
  assert change.changed_fraction == pytest.approx(2 / 6)
  assert change.changed_fraction_kept == pytest.approx(1 / 4)
  assert analysis.routing_change(a, a).changed_fraction[0] == 0.0
  with pytest.raises(ValueError, match='not of the same images'):
    analysis.routing_change(a, synthetic_trace([[0, 0, 1], [1, 1, 0]],
                                               [1, 1]))
  # Image 1: class token, then a 1x2 grid of patches (-1 = dropped).
  np.testing.assert_array_equal(analysis.expert_maps(a, 1), [[[-1, 0]]])


# -- a tiny trained token-choice model -----------------------------------------

TC_MOE = dict(layers=(1, 3), router='token_choice', num_experts=4, k=2,
              group_size=2 * 17, capacity_factor=0.5, batch_priority=True)


@pytest.fixture(scope='module')
def tc_run(digits_data_dir, tmp_path_factory):
  """ViT-mu/2 with token choice (4 experts, k=2, groups of 2 images,
  capacity factor 0.5 so that tokens are dropped), 8 steps, checkpoints at
  steps 4 and 8."""
  from vmoe.recipes import common
  workdir = str(tmp_path_factory.mktemp('analysis_tc'))
  config = tiny_digits_config(digits_data_dir, num_train_steps=8,
                              checkpoint_every_steps=4, eval_every_steps=8,
                              eval_batch_size=50)
  config.model.moe = common.moe_config(**TC_MOE)
  analysis.train(config, workdir)
  run = analysis.load(workdir)
  batches = list(analysis.eval_batches(run.config))
  return run, batches, analysis.collect(run.model, batches)


def test_load(tc_run):
  from vmoe.train import trainer
  run, _, _ = tc_run
  assert run.step == 8 and run.num_classes == 10
  assert analysis.checkpoint_steps(run.workdir) == [4, 8]
  expected = trainer.final_params(run.workdir)  # (block keys as strings)
  str_keys = lambda t: ({str(k): str_keys(v) for k, v in t.items()}  # noqa
                        if isinstance(t, dict) else t)
  jax.tree.map(np.testing.assert_array_equal, str_keys(run.params), expected)
  assert run.config.model.moe.layers == (1, 3)  # JSON lists back to tuples
  early = analysis.load(run.workdir, step=4)
  assert early.step == 4
  assert not np.array_equal(early.params['head']['kernel'],
                            expected['head']['kernel'])
  with pytest.raises(ValueError, match='step=5 is not a checkpoint'):
    analysis.load(run.workdir, step=5)


def test_trace_matches_layer_metrics(tc_run):
  """The trace's statistics of one batch equal the routing metrics the
  layers themselves report (computed by vmoe.nn.routing)."""
  run, batches, trace = tc_run
  images = batches[0]['image']
  _, metrics, captured = moe_lib.capture_routing(run.model, images)
  one = analysis.collect(run.model, batches[:1])
  assert one.labels.shape == (50,) and trace.labels.shape == (300,)
  summary = analysis.layer_summary(one).set_index('block')
  load = analysis.expert_load(one)
  for block in (1, 3):
    m = {k: np.asarray(v) for k, v in metrics.items()
         if k.startswith(f'block_{block}/')}
    row = summary.loc[block]
    assert row.dropped_fraction == pytest.approx(
        float(m[f'block_{block}/dropped_fraction']), abs=1e-6)
    assert row.entropy == pytest.approx(
        float(m[f'block_{block}/router_entropy']), rel=1e-5)
    np.testing.assert_allclose(load[load.block == block].token_share,
                               m[f'block_{block}/expert_load'], rtol=1e-5)
    assert row.capacity == 9  # ceil(k * s * cf / e) = ceil(2 * 34 * 0.5 / 4)
    # Token t of group j is image (j * 34 + t) // 17: the first image is the
    # first 17 tokens of group 0.
    r = captured[block].decision
    first = np.asarray(r.expert_index[0, :17, :])
    valid = np.asarray(r.valid[0, :17, :])
    np.testing.assert_array_equal(one.layers[block].dropped[0],
                                  ~valid.any(-1))
    np.testing.assert_array_equal(
        one.layers[block].assigned[0],
        np.stack([((first == e) & valid).any(-1) for e in range(4)], -1))
  assert summary.dropped_fraction.max() > 0  # capacity factor 0.5 drops


def test_routing_change_between_checkpoints(tc_run):
  run, batches, trace = tc_run
  early = analysis.collect(analysis.load(run.workdir, step=4).model, batches)
  change = analysis.routing_change(early, trace)
  assert (change.changed_fraction > 0).all()
  assert (change.changed_fraction <= 1).all()
  assert (analysis.routing_change(trace, trace).changed_fraction == 0).all()


def test_ablation(tc_run):
  run, batches, trace = tc_run
  images = batches[0]['image']
  # Zeroed expert parameters == the layer's disabled_experts hook. (Block 1:
  # with a class-token head, block 3's output reaches the logits only
  # through the class token.)
  zeroed = analysis.from_params(run.config, analysis.without_experts(
      run.params, 1, (2,)))
  run.model.blocks[1].mlp.disabled_experts = (2,)
  try:
    hooked, _ = jax.jit(lambda m, x: m(x, train=False))(run.model, images)
  finally:
    run.model.blocks[1].mlp.disabled_experts = ()
  ablated, _ = jax.jit(lambda m, x: m(x, train=False))(zeroed.model, images)
  plain, _ = jax.jit(lambda m, x: m(x, train=False))(run.model, images)
  np.testing.assert_allclose(ablated, hooked, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(ablated) - np.asarray(plain)).max() > 1e-4
  frame = analysis.expert_ablation(run.model, batches, blocks=[1])
  assert len(frame) == 10 + 4 * 10
  base = frame[frame.block == -1].set_index('label').accuracy
  for c in range(10):
    assert base[c] == pytest.approx(
        np.mean(trace.predictions[trace.labels == c] == c))
  rows = frame[frame.block == 1]
  assert (rows.delta != 0).any()
  np.testing.assert_allclose(rows.delta, rows.accuracy - rows.base_accuracy)
  with pytest.raises(ValueError, match='block 2 is not an MoE block'):
    analysis.expert_ablation(run.model, batches, blocks=[2])


def test_capacity_sweep(tc_run):
  run, batches, _ = tc_run
  early = analysis.load(run.workdir, step=4)
  frame = analysis.capacity_sweep([run, early], [0.5, 4.0], batches=batches)
  assert len(frame) == 8 and set(frame.batch_priority) == {True, False}
  big = frame[frame.capacity_factor == 4.0]
  # Nothing is dropped at capacity factor 4 (c = 17 of 34 tokens, k=2):
  # priority only reorders buffers, the outputs are the same.
  assert (big.dropped_fraction == 0).all()
  for _, same in big.groupby('run'):
    assert same.accuracy.nunique() == 1
  small = frame[frame.capacity_factor == 0.5]
  assert (small.dropped_fraction > 0.05).all()
  # The trained setting (BPR, cf 0.5) is the run's own final evaluation.
  trained = small[small.batch_priority & (small.run == 0)].iloc[0]
  assert trained.accuracy == pytest.approx(analysis.run_summary(
      run.workdir)['accuracy'])


def test_batch_dependence_token_choice(tc_run):
  run, batches, _ = tc_run
  out = analysis.batch_dependence(run.model, batches[0]['image'][:20])
  # Groups of 2 images at capacity factor 0.5: images compete for slots.
  assert out['changed_fraction'] > 0 and out['max_abs_logit_diff'] > 1e-4


def test_runs(tc_run):
  run, _, _ = tc_run
  records = analysis.read_metrics(run.workdir)
  last_eval = [r for r in records if r['split'] == 'eval'][-1]
  summary = analysis.run_summary(run.workdir)
  assert summary['accuracy'] == last_eval['accuracy'] and summary['step'] == 8
  assert summary['dropped_fraction'] == pytest.approx(np.mean(
      [last_eval['moe/block_1/dropped_fraction'],
       last_eval['moe/block_3/dropped_fraction']]))
  assert summary['train_seconds'] == pytest.approx(
      8 / summary['steps_per_sec'])
  config = run.config
  flops = analysis.train_flops_per_step(config)
  double = ml_collections.ConfigDict(config.to_dict())
  double.batch_size = 2 * config.batch_size
  ratio = analysis.train_flops_per_step(double) / flops
  # Everything but the optimizer update scales with the batch.
  assert flops > 0 and 1.9 < ratio <= 2.0


def test_fewshot_accuracy(tc_run):
  run, _, _ = tc_run
  frame = analysis.fewshot_accuracy(run, shots=(1, 5), seeds=2)
  assert frame[['seed', 'shots']].values.tolist() == [[0, 1], [0, 5], [1, 1],
                                                      [1, 5]]
  assert frame.accuracy.between(0, 1).all()
  assert frame.accuracy.nunique() > 1


# -- a tiny Soft MoE -----------------------------------------------------------


@pytest.fixture(scope='module')
def soft_model():
  """ViT-mu/2 (GAP, no class token) with Soft MoE blocks 2, 3: 2 experts x 2
  slots over groups of one image (16 patches); initial parameters."""
  moe = ml_collections.ConfigDict({**moe_lib.default_moe_config().to_dict(),
                                   **dict(layers='second_half', router='soft',
                                          num_experts=2, num_slots=2,
                                          group_size=16)})
  cfg = ml_collections.ConfigDict(dict(variant='mu/2', pool='gap', moe=moe))
  return vit.create_model(cfg, num_classes=10, image_size=8, num_channels=1,
                          rngs=nnx.Rngs(0))


def test_soft_maps(soft_model, digits_data_dir):
  config = tiny_digits_config(digits_data_dir, eval_batch_size=10)
  batch = next(analysis.eval_batches(config))
  maps = analysis.soft_maps(soft_model, batch['image'][:3], block=3)
  assert maps.dispatch.shape == (3, 4, 4, 4)
  # One image per group and no class token: each slot's dispatch weights
  # are a distribution over the 16 patches; combine weights over the slots.
  np.testing.assert_allclose(maps.dispatch.sum(axis=(2, 3)), 1, rtol=1e-5)
  np.testing.assert_allclose(maps.combine.sum(axis=1), 1, rtol=1e-5)
  np.testing.assert_array_equal(maps.slot_expert, [0, 0, 1, 1])
  trace = analysis.collect(soft_model, [batch])
  np.testing.assert_array_equal(analysis.expert_maps(trace, 1)[1],
                                maps.slot_expert[maps.top_slot[1]])
  assert analysis.layer_summary(trace).dropped_fraction.tolist() == [0, 0]
  with pytest.raises(ValueError, match='block 1 is not a Soft MoE layer'):
    analysis.soft_maps(soft_model, batch['image'][:3], block=1)


def test_slot_similarity(soft_model):
  layer = soft_model.blocks[2].mlp
  old = layer.router.phi[...]
  phi = np.zeros(old.shape, np.float32)  # [e=2, p=2, d=64]
  phi[0, 0, :2], phi[0, 1, :2] = [1, 0], [1, 1]
  phi[1, 0, :2], phi[1, 1, :2] = [0, 1], [-1, 0]
  layer.router.phi[...] = jnp.asarray(phi)
  try:
    sim, frame = analysis.slot_similarity(soft_model, 2)
  finally:
    layer.router.phi[...] = old
  # Within: cos([1,0],[1,1]) = 1/sqrt(2), cos([0,1],[-1,0]) = 0; across:
  # 0, -1, 1/sqrt(2), -1/sqrt(2) -> mean -1/4.
  np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-6)
  assert frame.within_expert[0] == pytest.approx(0.5 / np.sqrt(2))
  assert frame.across_experts[0] == pytest.approx(-0.25)


def test_batch_dependence_soft(soft_model, digits_data_dir):
  config = tiny_digits_config(digits_data_dir, eval_batch_size=10)
  images = next(analysis.eval_batches(config))['image']
  out = analysis.batch_dependence(soft_model, images)
  assert out['changed_fraction'] == 0.0
  assert out['max_abs_logit_diff'] <= 1e-5


def test_study_configs_and_retarget(digits_data_dir):
  configs = analysis.runs.study_configs()
  assert configs['dense'].model.moe is None
  assert configs['soft_k2'].model.moe.router == 'soft'
  assert list(configs) == sorted(configs)
  # 8x8 -> 16x16 images with 2x2 patches: 17 -> 65 tokens per image; groups
  # keep 4 images, Soft MoE its slots per token (17 * 65 / 17 = 65).
  cfg = configs['soft_k2']
  cfg.dataset.data_dir = digits_data_dir
  pytest.importorskip('tensorflow_datasets')  # retarget: a TFDS dataset
  moved = analysis.runs.retarget(cfg, 'digits', image_size=16,
                                 data_dir=digits_data_dir)
  assert moved.preprocess.image_size == 16
  assert moved.model.moe.group_size == 4 * 65
  assert moved.model.moe.num_slots == 65
  assert moved.preprocess.num_channels == 1 and not moved.preprocess.flip
  assert cfg.model.moe.group_size == 68  # the original is unchanged
  bad = ml_collections.ConfigDict(cfg.to_dict())
  bad.model.moe.group_size = 20
  with pytest.raises(ValueError, match='group_size=20 is not a whole number'):
    analysis.runs.retarget(bad, 'digits', image_size=16,
                           data_dir=digits_data_dir)
