"""Transfer recipe shared by the configs of this directory.

The fine-tuning protocol of the ViT paper (Dosovitskiy et al. 2021, App.
B.1.1), which the V-MoE paper (Riquelme et al. 2021) follows for transfer:
SGD with momentum 0.9, batch 512, no weight decay, gradient clipping at
global norm 1, 500 warmup steps then cosine decay, 384 px; Inception crop
(area 5%-100%) and horizontal flips in training, a plain resize at
evaluation; images in [-1, 1]. Steps: CIFAR-10 10k, Oxford-IIIT Pet 500.
The learning rate is the one of the paper's sweep {0.001, 0.003, 0.01, 0.03}
used here (0.003 unless a config says otherwise).
"""

import ml_collections

DATASETS = {
    # name: (train split, eval split, steps)
    'cifar10': ('train[:98%]', 'test', 10_000),
    'oxford_iiit_pet': ('train', 'test', 500),
}


def transfer(config: ml_collections.ConfigDict, dataset: str, *,
             checkpoint: str, learning_rate: float = 0.003,
             image_size: int = 384) -> ml_collections.ConfigDict:
  """Fine-tuning of `checkpoint` on `dataset` at `image_size` px."""
  train_split, eval_split, steps = DATASETS[dataset]
  config.dataset.name = dataset
  config.dataset.train_split = train_split
  config.dataset.eval_split = eval_split
  config.dataset.shuffle_buffer = 50_000
  config.preprocess.image_size = image_size
  config.preprocess.num_channels = 3
  config.preprocess.train_crop = 'random_resized'
  config.preprocess.crop_scale = (0.05, 1.0)
  config.preprocess.flip = True
  config.preprocess.value_range = (-1.0, 1.0)
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = steps
  config.log_every_steps = 50
  config.eval_every_steps = min(1000, steps)
  config.checkpoint_every_steps = min(1000, steps)
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = learning_rate
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = 500 if steps > 500 else 100
  config.model.dtype = 'bfloat16'
  config.init_from.path = checkpoint
  config.init_from.head = 'new'  # zero-initialised, as big_vision / vit_jax
  return config
