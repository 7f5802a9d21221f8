"""Figures of the router studies, drawn the same way in every notebook.

* One colour per study config in every figure (`config_colors`: the position
  of the config in the full study list, so a quick run with four configs
  colours them as the full run does), with a legend.
* Error bars wherever a value has several seeds (`errorbar_by_config`);
  single-seed points are drawn hollow and say so in the legend.
* Maps that share a scale share one colourbar (`shared_images`), and
  categorical maps get a key (`category_key`).
* 150 dpi and 9-point labels (`STYLE`, `savefig`).
* Words for what a plot cannot show by itself: `describe_uniformity` and
  `describe_entropy` say when weights are within a few percent of uniform.

`training_curves` draws loss, accuracy, dropped fraction and auxiliary loss
against the step from the runs' `metrics.jsonl` records.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np

DPI = 150
STYLE = {
    'font.size': 9, 'axes.titlesize': 9, 'axes.labelsize': 9,
    'xtick.labelsize': 8, 'ytick.labelsize': 8, 'legend.fontsize': 8,
    'figure.dpi': 100, 'savefig.dpi': DPI, 'axes.grid': True,
    'grid.alpha': 0.3,
}
DENSE_COLOR = '#000000'
# Distinct colours for up to 40 configs (tab20 then tab20b); dense is black.
_PALETTE = [matplotlib.colors.to_hex(c) for name in ('tab20', 'tab20b')
            for c in plt.get_cmap(name).colors]
# Of the two shades of a tab20 hue, the darker first: neighbours in the study
# list (often variants of one router) stay tellable apart.
_PALETTE = _PALETTE[0::2] + _PALETTE[1::2]


def use_style() -> None:
  """Applies STYLE to matplotlib's defaults (notebooks call it once)."""
  matplotlib.rcParams.update(STYLE)


def config_colors(all_configs: Sequence[str]) -> dict[str, str]:
  """{config: colour}: 'dense' black, the others by their position in
  `all_configs` (the full, ordered study list)."""
  names = [n for n in all_configs if n != 'dense']
  if len(names) > len(_PALETTE):
    raise ValueError(f'{len(names)} configs: at most {len(_PALETTE)} get '
                     'distinct colours')
  colors = dict(zip(names, _PALETTE))
  if 'dense' in all_configs:
    colors['dense'] = DENSE_COLOR
  return colors


def savefig(fig: matplotlib.figure.Figure, path: str) -> str:
  """Saves at DPI with tight bounds; returns the path."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches='tight')
  return path


def legend_outside(ax: matplotlib.axes.Axes, **kwargs: Any) -> None:
  """A legend right of the axes (it never covers points)."""
  handles, labels = ax.get_legend_handles_labels()
  if handles:
    ax.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, **kwargs)


def errorbar_by_config(ax: matplotlib.axes.Axes, frame: Any, x: str, y: str,
                       colors: Mapping[str, str], *, yerr: str | None = None,
                       seeds: str | None = None, config: str = 'config',
                       label: bool = True) -> None:
  """One point per row of `frame` (a pandas frame with a `config` column),
  coloured by config, with `yerr` as error bars where `seeds` > 1; rows with
  one seed are drawn hollow ('1 seed' in the label)."""
  for row in frame.itertuples(index=False):
    name = getattr(row, config)
    n = int(getattr(row, seeds)) if seeds else 1
    err = getattr(row, yerr) if yerr and n > 1 else None
    if err is not None and not math.isfinite(float(err)):
      err = None
    color = colors[name]
    ax.errorbar(getattr(row, x), getattr(row, y), yerr=err, capsize=3,
                fmt='s' if name == 'dense' else 'o', color=color,
                markerfacecolor=color if n > 1 else 'white',
                label=(f'{name} ({n} seeds)' if n > 1 else f'{name} (1 seed)')
                if label else None)


def shared_images(fig: matplotlib.figure.Figure,
                  axes: Sequence[matplotlib.axes.Axes],
                  arrays: Sequence[np.ndarray], *, cmap: str, label: str,
                  vmin: float | None = None, vmax: float | None = None,
                  **imshow: Any) -> matplotlib.colorbar.Colorbar:
  """imshow of every array on one colour scale (the min / max over all of
  them unless given) with a single colourbar for the lot."""
  values = np.concatenate([np.ravel(np.ma.filled(np.ma.masked_invalid(a),
                                                 np.nan)) for a in arrays])
  values = values[np.isfinite(values)]
  lo = float(values.min()) if vmin is None and values.size else vmin
  hi = float(values.max()) if vmax is None and values.size else vmax
  if lo is None or hi is None or not hi > lo:
    lo, hi = (lo or 0.0), (lo or 0.0) + 1.0
  image = None
  for ax, array in zip(axes, arrays):
    image = ax.imshow(array, cmap=cmap, vmin=lo, vmax=hi, **imshow)
  return fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)


def category_key(fig: matplotlib.figure.Figure, colors: Sequence[Any],
                 labels: Sequence[str], *, title: str,
                 extra: Iterable[tuple[Any, str]] = ()) -> None:
  """A legend of coloured squares for a categorical map (e.g. the expert
  of every patch), placed right of the figure."""
  handles = [matplotlib.patches.Patch(facecolor=c, edgecolor='0.5', label=l)
             for c, l in list(zip(colors, labels)) + list(extra)]
  fig.legend(handles=handles, title=title, loc='center left',
             bbox_to_anchor=(1.0, 0.5), frameon=False)


def describe_uniformity(weights: np.ndarray, axis: int, *,
                        what: str = 'weights', tolerance: float = 0.25
                        ) -> str:
  """A sentence on how far weights that sum to 1 along `axis` are from the
  uniform 1/n: 'near uniform' when every weight is within `tolerance`
  (relative) of it, so a map of them shows no structure."""
  w = np.asarray(weights, np.float64)
  n = w.shape[axis]
  uniform = 1.0 / n
  lo, hi = float(w.min()), float(w.max())
  spread = max(abs(lo - uniform), abs(hi - uniform)) / uniform
  text = (f'{what} range {lo:.3f} to {hi:.3f} against the uniform '
          f'1/{n} = {uniform:.3f}')
  if spread <= tolerance:
    return (f'{text}: near uniform (every weight within {spread:.0%} of '
            'it), a uniform average with no structure to read')
  return f'{text}: up to {spread:.0%} away from uniform'


def describe_entropy(entropy: float, num_choices: int, *,
                     what: str = 'router entropy',
                     threshold: float = 0.98) -> str:
  """A sentence comparing an entropy (nats) with its maximum ln(n)."""
  top = math.log(num_choices)
  ratio = entropy / top if top > 0 else float('nan')
  text = (f'{what} {entropy:.2f} nats of at most ln {num_choices} = '
          f'{top:.2f} ({ratio:.1%})')
  if ratio >= threshold:
    return f'{text}: uniform averaging'
  return text


CURVES = (
    ('train', 'loss', 'training loss'),
    ('eval', 'accuracy', 'test accuracy'),
    ('eval', 'dropped_fraction', 'dropped fraction of tokens (test)'),
    ('train', 'moe/auxiliary_loss', 'auxiliary loss (training)'),
)


def _is_block_key(key: str, metric: str) -> bool:
  """'moe/block_<i>/<metric>' (not a deeper key such as MoD's
  'moe/block_<i>/depth/<metric>')."""
  parts = key.split('/')
  return (len(parts) == 3 and parts[0] == 'moe'
          and parts[1].startswith('block_') and parts[2] == metric)


def _series(records: Sequence[Mapping[str, Any]], split: str, metric: str
            ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `metric` in `split`; a metric the records hold only
  per MoE block ('moe/block_<i>/<metric>') is averaged over the blocks."""
  steps, values = [], []
  for record in records:
    if record.get('split') != split:
      continue
    if metric in record:
      value = record[metric]
    else:
      per_block = [v for k, v in record.items()
                   if _is_block_key(k, metric) and np.ndim(v) == 0]
      if not per_block:
        continue
      value = float(np.mean(per_block))
    steps.append(int(record['step']))
    values.append(float(value))
  return np.asarray(steps), np.asarray(values)


def training_curves(records: Mapping[str, Sequence[Sequence[Mapping[str,
                                                                     Any]]]],
                    colors: Mapping[str, str],
                    curves: Sequence[tuple[str, str, str]] = CURVES
                    ) -> matplotlib.figure.Figure:
  """One panel per (split, metric, label) of `curves`: per config the mean
  over its seeds' runs (records[config] = one record list per seed) against
  the step, with the min-max range of the seeds shaded. Configs that never
  log a metric (dense: no dropped fraction) are left out of its panel."""
  cols = 2
  rows = -(-len(curves) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(10, 3.2 * rows),
                           squeeze=False)
  for ax, (split, metric, label) in zip(axes.flat, curves):
    for name, per_seed in records.items():
      series = [_series(r, split, metric) for r in per_seed]
      series = [s for s in series if s[0].size]
      if not series:
        continue
      steps = series[0][0]
      same = [v for s, v in series if np.array_equal(s, steps)]
      stack = np.stack(same)
      ax.plot(steps, stack.mean(axis=0), color=colors[name],
              label=f'{name} ({len(same)} seed{"s" if len(same) > 1 else ""})')
      if len(same) > 1:
        ax.fill_between(steps, stack.min(axis=0), stack.max(axis=0),
                        color=colors[name], alpha=0.15, lw=0)
    ax.set_xlabel('training step')
    ax.set_ylabel(label)
  for ax in list(axes.flat)[len(curves):]:
    ax.axis('off')
  handles = {}
  for ax in axes.flat:
    for h, l in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(l, h)
  if handles:
    fig.legend(list(handles.values()), list(handles), loc='center left',
               bbox_to_anchor=(1.0, 0.5), frameon=False)
  fig.tight_layout()
  return fig
