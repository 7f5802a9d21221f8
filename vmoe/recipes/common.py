"""Shared defaults for every experiment config.

Each config file calls `get_base_config()` and overrides what its experiment
needs; all fields a user can set on the command line exist here, so a typo in
`--config.foo=...` is rejected by ml_collections before anything runs.
"""

import os

import ml_collections


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR',
                        os.path.expanduser('~/tensorflow_datasets'))


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 128  # global, over all processes and devices
  config.eval_batch_size = 256
  config.num_train_steps = 1000
  config.log_every_steps = 50
  config.eval_every_steps = 500  # also evaluated at the last step
  config.checkpoint_every_steps = 500  # also saved at the last step
  config.max_to_keep = 3
  config.label_smoothing = 0.0
  # 'softmax_xent' | 'sigmoid_xent' (per-class binary cross-entropy summed
  # over classes: the V-MoE upstream and AugReg recipes).
  config.loss = 'softmax_xent'
  # Micro-batches per step: k > 1 runs batch_size / k images at a time
  # inside the step and applies their mean gradient once (the same update).
  config.grad_accum_steps = 1
  # Print parameters, FLOPs and per-device memory of the train step (compiled
  # for the mesh; --num_cpu_devices=N simulates N devices) and exit.
  config.dry_run = False
  # (first, last): write a jax.profiler trace of these train steps (1-based,
  # as logged) into <workdir>/profile (TensorBoard profile plugin, Perfetto).
  config.profile_steps = None
  # Cost reporting (vmoe/train/cost.py): peak TFLOP/s per device for MFU and
  # device memory in GiB for the dry run's "fits"; None = from the device
  # table, or the CPU's matmul peak measured at start.
  config.cost = ml_collections.ConfigDict(dict(peak_tflops=None,
                                               memory_gib=None))
  # Start from a checkpoint (path None = from scratch): big_vision / vit_jax
  # .npz, vmoe prefix or a workdir of ours; new head, resized position
  # embeddings, freezing, sparse upcycling (vmoe/checkpoints/init_from.py).
  config.init_from = ml_collections.ConfigDict(dict(
      path=None, format='auto', head='auto', resize_posemb=True, reinit=None,
      freeze=None, upcycle=False, upcycle_noise=0.0))

  # Device mesh: axis name -> size, -1 meaning all remaining devices. The batch
  # is split over every axis; expert weights over 'expert'.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'expert': 1})
  # Parameter sharding (vmoe/sharding.py): logical axis -> mesh axis rules,
  # path-regex overrides, FSDP of large parameters over 'data' (0 = off).
  config.partitioning = ml_collections.ConfigDict()
  config.partitioning.rules = (('expert', 'expert'),)
  config.partitioning.overrides = ((r'(^|/)router/', ()),)
  config.partitioning.fsdp_min_size = 0
  config.partitioning.fsdp_regex = '.*'

  config.dataset = ml_collections.ConfigDict()
  # Where the examples come from (vmoe.data.base): 'tfds' | 'arrays' |
  # 'folder' | 'synthetic'.
  config.dataset.source = 'tfds'
  config.dataset.name = 'digits'
  config.dataset.data_dir = default_data_dir()
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.download = False  # never touch the network unless asked
  config.dataset.cache = False
  config.dataset.shuffle_buffer = 10_000
  config.dataset.image_key = 'image'
  config.dataset.label_key = 'label'
  config.dataset.num_workers = 0  # folder: grain threads (0 = 8)
  config.dataset.num_classes = None  # synthetic only: K
  config.dataset.num_examples = None  # synthetic only: (train, eval) examples

  config.preprocess = ml_collections.ConfigDict()
  config.preprocess.image_size = 224
  config.preprocess.num_channels = 3
  config.preprocess.train_crop = 'random_resized'  # | 'pad_random_crop' | 'resize'
  config.preprocess.crop_scale = (0.08, 1.0)
  config.preprocess.crop_padding = 4
  config.preprocess.flip = True
  config.preprocess.value_range = (-1.0, 1.0)
  config.preprocess.mixup_alpha = 0.0
  # RandAugment (big_vision / vmoe): None or (num_layers, magnitude); the
  # AugReg presets set it with mixup (vmoe/recipes/augreg.py).
  config.preprocess.randaug = None
  config.preprocess.resize_method = 'bilinear'

  config.model = ml_collections.ConfigDict()
  config.model.variant = 'B/16'
  config.model.pool = 'tok'  # 'tok' (class token) | 'gap'
  config.model.dropout = 0.0
  config.model.stochastic_depth = 0.0
  config.model.dtype = 'float32'  # activations; 'bfloat16' for mixed precision
  config.model.param_dtype = 'float32'  # stored parameters
  # Identical blocks as scanned stacks with stacked parameters (compile time
  # independent of depth); checkpoints load in either layout.
  config.model.scan_layers = False
  # jax.checkpoint of every block: 'none' | 'full' | 'dots' |
  # 'dots_no_batch' | 'save:qkv,attn,mlp' (vmoe/nn/scan.py).
  config.model.remat = 'none'
  config.model.head_zero_init = True
  config.model.head_bias_init = 0.0  # e.g. -log(classes) for sigmoid_xent
  # 'tanh' (jax.nn.gelu's default, used by vit_jax, big_vision and vmoe, so
  # published weights compute the published function) | 'exact' (erf).
  config.model.gelu = 'tanh'
  # Sizes not among the named variants (e.g. imported checkpoints): None =
  # from model.variant, whose patch size always applies.
  config.model.width = None
  config.model.depth = None
  config.model.mlp_dim = None
  config.model.num_heads = None
  config.model.representation_size = None  # pre-logits Dense + tanh
  config.model.moe = None  # a ConfigDict from moe_config() below
  # Attention kind of every block and block kind (vmoe.nn.attention,
  # vmoe.nn.blocks), each with the options of all kinds (docs/layers.md).
  config.model.attention = 'mha'  # | 'moh' | 'gated'
  config.model.attention_options = kind_options('attention')
  config.model.block = 'standard'  # | 'mod' | 'mone'
  config.model.block_options = kind_options('blocks')

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'  # | 'adam' | 'sgd'
  config.optimizer.learning_rate = 1e-3  # peak
  # A number (every kernel: ndim >= 2) or ((regex, value), ...) per parameter.
  config.optimizer.weight_decay = ml_collections.FieldReference(
      1e-4, field_type=object)
  config.optimizer.mu_dtype = None  # Adam's first moment: None | 'bfloat16'
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.momentum = 0.9  # sgd
  config.optimizer.nesterov = False  # sgd
  config.optimizer.grad_clip_norm = 1.0  # 0 disables

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'cosine'  # | 'linear' | 'rsqrt' | 'constant'
  config.schedule.warmup_steps = 100  # clamped to num_train_steps
  config.schedule.warmup_fraction = None  # or of num_train_steps (then
                                          # warmup_steps = None)
  config.schedule.end_lr_fraction = 0.0  # cosine/linear: final lr / peak lr
  config.schedule.rsqrt_timescale = 10_000

  # Few-shot linear evaluation on frozen pre-logits (vmoe/evaluate/fewshot.py):
  # every `every_steps` steps and at the last (0 = off), records with split
  # 'fewshot' in metrics.jsonl. dataset / data_dir None = config.dataset's.
  config.fewshot = ml_collections.ConfigDict(dict(
      every_steps=0, dataset=None, data_dir=None, train_split='train',
      test_split='test', shots=(1, 5, 10, 25), seeds=3, l2_reg=2.0 ** 10))
  return config


def digits_data(config: ml_collections.ConfigDict,
                image_size: int = 8) -> ml_collections.ConfigDict:
  """Points `config` at the embedded digits dataset (8x8 grayscale), read as
  arrays (no TensorFlow, no download); `--config.dataset.source=tfds` reads
  the same examples through TFDS."""
  config.dataset.source = 'arrays'
  config.dataset.name = 'digits'
  config.preprocess.image_size = image_size
  config.preprocess.num_channels = 1
  # No random crops: a 1-pixel shift of a centred 8x8 digit hurts more than it
  # regularises (a linear probe drops from 0.98 to 0.77 test accuracy).
  config.preprocess.train_crop = 'resize'
  config.preprocess.flip = False  # digits are not mirror-symmetric
  return config


def imagenet_data(config: ml_collections.ConfigDict,
                  name: str = 'imagenet2012') -> ml_collections.ConfigDict:
  """ImageNet-style input: Inception crop + flip at 224px, RGB in [-1, 1];
  evaluation resizes the short side to 256 and takes the central 224 x 224
  crop (`decode|resize_small(256)|central_crop(224)` of big_vision and
  vmoe).

  The data must be prepared in `config.dataset.data_dir` (see README).
  """
  config.dataset.name = name
  config.dataset.train_split = 'train[:99%]'
  config.dataset.eval_split = 'train[99%:]' if name == 'imagenet21k' else 'validation'
  config.dataset.shuffle_buffer = 250_000
  config.preprocess.image_size = 224
  config.preprocess.num_channels = 3
  config.preprocess.train_crop = 'random_resized'
  config.preprocess.crop_scale = (0.05, 1.0)
  config.preprocess.flip = True
  config.preprocess.eval_crop_fraction = 224 / 256
  return config


def imagenet_recipe(config: ml_collections.ConfigDict,
                    aug: str) -> ml_collections.ConfigDict:
  """big_vision's ViT recipe for ImageNet-1k from scratch
  (big_vision/configs/vit_i1k.py, the AugReg paper's setting, Steiner et
  al. 2022): 300 epochs at batch 4096; Adam (0.9, 0.999) with its first
  moment in bfloat16, learning rate 1e-3 with 10k warmup steps and cosine
  decay, gradient clipping at norm 1; weight decay on the kernels only,
  0.1 here (decoupled and scaled by the learning rate: big_vision's wd
  1e-4 is applied after the learning rate, 1e-3 x 0.1); sigmoid
  cross-entropy with the head bias at -6.9 (~ -log 1000); Inception crop,
  flip and the AugReg preset `aug` (`augreg.PRESETS`: RandAugment, mixup)
  in training, resize 256 + central crop 224 at evaluation; bfloat16
  activations. big_vision's defaults per model: Ti/16 light0, S/32
  medium1, S/16, B/32, B/16, L/16 medium2 (our names, `augreg`)."""
  from vmoe.recipes import augreg as augreg_lib  # pylint: disable=g-import-not-at-top
  imagenet_data(config)
  augreg_lib.augreg(config, aug)
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.num_train_steps = 93_000  # 300 epochs of 1.27M images
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  config.loss = 'sigmoid_xent'
  config.model.head_bias_init = -6.9
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = (('kernel', 0.1),)
  config.optimizer.mu_dtype = 'bfloat16'
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = 10_000
  config.model.dtype = 'bfloat16'
  return config


def kind_options(package: str, **overrides) -> ml_collections.ConfigDict:
  """The options of every kind of `vmoe.nn.<package>` ('attention' or
  'blocks') at their defaults, with `overrides`."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'vmoe.nn.{package}')
  config = ml_collections.ConfigDict(module.default_options())
  config.update(overrides)
  return config


def moe_config(**overrides) -> ml_collections.ConfigDict:
  """MoE options (see `vmoe.nn.moe.default_moe_config`) plus `layers`."""
  from vmoe.nn import moe  # pylint: disable=g-import-not-at-top
  config = moe.default_moe_config()
  config.update(overrides)
  return config


def digits_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU-sized training on digits shared by every `*_digits.py` config:
  ViT-mu/2 (4 blocks, width 64) on 8x8 digits, 800 steps of 128 images.
  Weight decay 0.05 and mixup 0.5 keep the tiny ViT from overfitting 1497
  images (test accuracy 0.95 -> 0.97)."""
  digits_data(config)
  config.model.variant = 'mu/2'
  config.batch_size = 128
  # Divides into whole routing groups on 1, 2, 4 and 8 devices (40 images of
  # 17 tokens per device on 8); the 300 test images are one padded batch.
  config.eval_batch_size = 320
  config.num_train_steps = 800
  config.log_every_steps = 25
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.05
  config.preprocess.mixup_alpha = 0.5
  # 50 of 800 steps; a fraction, so that --config.num_train_steps=N alone
  # keeps a warmup of N / 16 steps.
  config.schedule.warmup_steps = None
  config.schedule.warmup_fraction = 1 / 16
  config.label_smoothing = 0.1
  return config
