"""vmoe.analysis.plots: colours that stay with their config, saved figures at
150 dpi, shared colour scales, and the uniformity sentences."""

import math

import numpy as np
import pytest

matplotlib = pytest.importorskip('matplotlib')
matplotlib.use('Agg')
pd = pytest.importorskip('pandas')
PIL = pytest.importorskip('PIL.Image')

from vmoe.analysis import plots  # pylint: disable=g-import-not-at-top

ALL = ['dense'] + [f'router_{i}' for i in range(15)]


def test_colours_are_distinct_and_stable_across_subsets():
  colors = plots.config_colors(ALL)
  assert len(set(colors.values())) == len(ALL)
  assert colors['dense'] == plots.DENSE_COLOR
  # A quick run draws a subset with the colours of the full run.
  assert plots.config_colors(ALL)['router_7'] == colors['router_7']
  with pytest.raises(ValueError, match='41 configs'):
    plots.config_colors([f'c{i}' for i in range(41)])


def test_saved_figures_are_150_dpi_with_a_legend_entry_per_config(tmp_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colors = plots.config_colors(ALL)
  frame = pd.DataFrame(dict(config=['dense', 'router_0', 'router_1'],
                            flops=[1.0, 2.0, 2.0], accuracy=[0.8, 0.85, 0.9],
                            accuracy_std=[0.01, 0.02, float('nan')],
                            seeds=[3, 3, 1]))
  fig, ax = plt.subplots()
  plots.errorbar_by_config(ax, frame, 'flops', 'accuracy', colors,
                           yerr='accuracy_std', seeds='seeds')
  plots.legend_outside(ax)
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ['dense (3 seeds)', 'router_0 (3 seeds)',
                    'router_1 (1 seed)']
  path = plots.savefig(fig, str(tmp_path / 'f.png'))
  plt.close(fig)
  with PIL.open(path) as image:
    dpi = image.info['dpi']
  assert min(dpi) >= 149.5


def test_shared_images_use_one_scale_and_one_colourbar():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3)
  arrays = [np.full((2, 2), 0.1), np.array([[0.0, 0.5], [0.2, 0.3]]),
            np.full((2, 2), 0.4)]
  bar = plots.shared_images(fig, axes, arrays, cmap='viridis', label='share')
  limits = {ax.images[0].get_clim() for ax in axes}
  assert limits == {(0.0, 0.5)}
  assert bar.ax.get_ylabel() == 'share'
  assert len(fig.axes) == 4  # three panels and one colourbar
  plt.close(fig)


def test_uniformity_and_entropy_sentences():
  # Soft MoE combine weights of 17 slots, within a few percent of 1/17.
  near = np.full((4, 17), 1 / 17) * (1 + 0.05 * np.sin(np.arange(17)))
  near /= near.sum(axis=1, keepdims=True)
  text = plots.describe_uniformity(near, axis=1)
  assert 'near uniform' in text and '1/17 = 0.059' in text
  peaked = np.eye(4)[:, :4] * 0.9 + 0.025
  assert 'away from uniform' in plots.describe_uniformity(peaked, axis=1)
  assert plots.describe_entropy(4.90, 136).endswith('uniform averaging')
  assert 'uniform' not in plots.describe_entropy(0.5 * math.log(136), 136)


def test_training_curves_average_seeds_and_skip_missing_metrics():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def run(offset):
    out = []
    for step in (10, 20):
      out.append({'step': step, 'split': 'train', 'loss': 2.0 - step / 20
                  + offset, 'moe/auxiliary_loss': 0.01,
                  'moe/block_1/dropped_fraction': 0.1,
                  'moe/block_1/depth/dropped_fraction': 0.9})
      out.append({'step': step, 'split': 'eval', 'accuracy': 0.5 + offset,
                  'moe/block_1/dropped_fraction': 0.2,
                  'moe/block_3/dropped_fraction': 0.4})
    return out

  dense = [[{k: v for k, v in r.items() if not k.startswith('moe/')}
            for r in run(0.0)] for _ in range(2)]
  fig = plots.training_curves({'dense': dense,
                               'router_0': [run(0.0), run(0.2)]},
                              plots.config_colors(ALL))
  panels = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}
  loss = panels['training loss']
  assert len(loss.lines) == 2
  router_loss = [l for l in loss.lines if l.get_color() != '#000000'][0]
  np.testing.assert_allclose(router_loss.get_ydata(), [1.6, 1.1])
  dropped = panels['dropped fraction of tokens (test)']
  assert len(dropped.lines) == 1  # dense logs none
  np.testing.assert_allclose(dropped.lines[0].get_ydata(), [0.3, 0.3])
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels == ['dense (2 seeds)', 'router_0 (2 seeds)']
  plt.close(fig)
