"""Layer time against the number of experts at fixed active compute.

    python -m bench.scaling --quick     # 8 and 256 experts, smaller batches
    python -m bench.scaling             # 8, 32, 128, 256 experts (~3 min)

ViT-S dims (d=384, h=1536). The active compute is held fixed by fixing the
number of expert slots per routing group, n = e * c, so that only the number
of experts changes:

  token choice (k=2, BPR): groups of 16 images (3152 tokens), n = 6144 slots
    (c = 6144 / e: 768 at e=8, 24 at e=256; capacity factor 0.97), 176 images
    per batch: 67584 expert rows, 264 per expert at e=256.
  Soft MoE: groups of one image (197 tokens, as in the paper), n = 2048 slots
    (p = 2048 / e: 256 at e=8, 8 at e=256), 32 images: 65536 expert rows, 256
    per expert at e=256. Its dispatch/combine cost grows with s * n and is the
    same for every e.

Every expert keeps at least 8 slots per group. What grows with e: the
parameters (2 x 151M per layer at e=256) and so the weight traffic, the router
(2 * d * e FLOPs per token, plus its noise, softmax, top-k and losses over e),
and the per-expert matmuls get shorter. Rows per expert is what decides the
matmul efficiency on CPU: below ~200 rows the batched matmuls run well under
peak (the quick mode, with 4x fewer rows, shows it).

Times are fwd+bwd medians interleaved with a dense MLP of equal active FLOPs;
`ratio_vs_8` is time / time at 8 experts. Writes CSV/JSON/MD and a PNG plot.
"""

from __future__ import annotations

import argparse
import os

from bench import common
from bench import moe_layer as ml

TC_GROUP_IMAGES = 16   # token choice: groups of 3152 tokens
TC_SLOTS = 6144        # token choice slots per group (k=2, s=3152)
SOFT_SLOTS = 2048      # Soft MoE slots per one-image group


def sections(quick: bool) -> list[tuple[str, list[ml.Case], int]]:
  """(router, cases, images per batch); quick: 4x fewer rows, e=8 and 256."""
  experts = (8, 256) if quick else (8, 32, 128, 256)
  tc = [ml.Case('token_choice', e, TC_GROUP_IMAGES, k=2, bpr=True,
                capacity=TC_SLOTS // e) for e in experts]
  soft = [ml.Case('soft', e, 1, num_slots=SOFT_SLOTS // e) for e in experts]
  scale = 4 if quick else 1
  return [('token choice', tc, 176 // scale // TC_GROUP_IMAGES
           * TC_GROUP_IMAGES), ('soft', soft, 32 // scale)]


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for layer in sorted({r['layer'] for r in rows if r['layer'] != 'dense MLP'}):
    pts = sorted((r['experts'], r['ratio_vs_8']) for r in rows
                 if r['layer'] == layer)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=layer)
  ax.axhline(1.3, ls='--', lw=1, color='gray')
  ax.annotate('target 1.3x', (8, 1.3), fontsize=7, color='gray',
              va='bottom')
  ax.set_xscale('log', base=2)
  ticks = sorted({r['experts'] for r in rows if r['layer'] != 'dense MLP'})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel('number of experts (fixed active compute)')
  ax.set_ylabel('fwd+bwd time / time at 8 experts')
  ax.set_ylim(0.8, max(1.6, max(r.get('ratio_vs_8', 0) for r in rows) + 0.1))
  ax.set_title('MoE layer, ViT-S dims')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(quick: bool, repeats: int | None = None, peak: dict | None = None):
  peak = peak or common.matmul_peak()
  info = common.machine_info(peak)
  rows = []
  for title, cases, images in sections(quick):
    section = ml.run_section(f'scaling {title}', cases, images, repeats or 3,
                             peak['f32'])
    base = {r['layer']: r['fwd_bwd_ms'] for r in section
            if r.get('experts') == 8}
    for r in section:
      if r['layer'] in base:
        r['ratio_vs_8'] = r['fwd_bwd_ms'] / base[r['layer']]
    rows += section
  cols = ['layer', 'experts', 'capacity', 'rows_per_expert', 'slots',
          'fwd_ms', 'fwd_bwd_ms', 'fwd_bwd_ratio', 'ratio_vs_8', 'peak_mb']
  heads = ['layer', 'e', 'c (slots/expert/group)', 'rows/expert', 'slots',
           'fwd ms', 'fwd+bwd ms', 'ratio to dense', 'ratio to e=8',
           'peak MB']
  md = '\n'.join([
      '### Scaling in the number of experts (fixed active compute)'
      f'{" (quick: 4x fewer rows)" if quick else ""}', '',
      common.machine_line(info), '',
      common.markdown_table(rows, cols, heads)])
  name = 'scaling_quick' if quick else 'scaling'
  paths = common.save_results(name, rows, info, md)
  png = os.path.join(common.RESULTS_DIR, f'{name}.png')
  plot(rows, png)
  md += (f'\n\nPlot: `{os.path.relpath(png)}`, CSV: '
         f'`{os.path.relpath(paths["csv"])}`')
  return md, rows, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args()
  print(run(args.quick, args.repeats)[0])


if __name__ == '__main__':
  main()
