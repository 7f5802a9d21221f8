"""Layer time vs number of experts at fixed active compute (PNG + CSV).

    python -m bench.scaling --quick     # 8 and 256 experts, 32 images
    python -m bench.scaling             # 8, 16, ..., 256 experts

ViT-S dims (d=384, h=1536), 64 images (quick: 32) of 197 tokens. The active
compute is held fixed by fixing the number of expert slots per group, n = e * c:
token choice k=2 BPR in groups of 16 images (3152 tokens), n = 6144 (c = 6144 /
e, capacity factor ~0.97, 24 tokens per expert and group at e=256); Soft MoE in
groups of one image (197 tokens, as in the Soft MoE paper), n = 256 (p = 256 /
e slots per expert: 32 at e=8, 1 at e=256). Soft MoE's dispatch/combine cost
grows with s * n, so large groups would measure the contractions, not the
experts. What grows with e is the parameter count (and so the weight traffic),
the router projection (2 * s * d * e FLOPs) and the routing bookkeeping.

The times are fwd+bwd medians interleaved with a dense MLP of equal active
FLOPs; `ratio_vs_8` is time / time at 8 experts.
"""

from __future__ import annotations

import argparse
import os

from bench import common
from bench import moe_layer as ml

GROUP_IMAGES = 16      # token choice: groups of 3152 tokens
TC_SLOTS = 6144        # token choice slots per group (k=2, s=3152)
SOFT_GROUP_IMAGES = 1  # Soft MoE: groups of one image (197 tokens)
SOFT_SLOTS = 256       # Soft MoE slots per group (1 per expert at e=256)


def cases(experts) -> list[ml.Case]:
  out = []
  for e in experts:
    out.append(ml.Case('token_choice', e, GROUP_IMAGES, k=2, bpr=True,
                       capacity=TC_SLOTS // e))
    out.append(ml.Case('soft', e, SOFT_GROUP_IMAGES,
                       num_slots=SOFT_SLOTS // e))
  return out


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for layer in sorted({r['layer'] for r in rows if r['layer'] != 'dense MLP'}):
    pts = sorted((r['experts'], r['fwd_bwd_ms']) for r in rows
                 if r['layer'] == layer)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=layer)
  for r in rows:
    if r['layer'] == 'dense MLP':
      ax.axhline(r['fwd_bwd_ms'], ls='--', lw=1, color='gray')
      ax.annotate(f'dense MLP, {r["slots"]} tokens', (8, r['fwd_bwd_ms']),
                  fontsize=7, color='gray', va='bottom')
  ax.set_xscale('log', base=2)
  ticks = sorted({r['experts'] for r in rows if r['layer'] != 'dense MLP'})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel('number of experts')
  ax.set_ylabel('fwd+bwd time per step (ms)')
  ax.set_ylim(bottom=0)
  ax.set_title('MoE layer, ViT-S dims, fixed active compute')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(quick: bool, repeats: int | None = None, peak: dict | None = None):
  peak = peak or common.matmul_peak()
  info = common.machine_info(peak)
  experts = (8, 256) if quick else (8, 16, 32, 64, 128, 256)
  rows = ml.run_section('scaling', cases(experts), 32 if quick else 64,
                        repeats or 3, peak['f32'],
                        base_dense=False)
  base = {r['layer']: r['fwd_bwd_ms'] for r in rows if r['experts'] == 8}
  for r in rows:
    if r['layer'] in base:
      r['ratio_vs_8'] = r['fwd_bwd_ms'] / base[r['layer']]
  cols = ['layer', 'experts', 'capacity', 'slots', 'fwd_ms', 'fwd_bwd_ms',
          'fwd_bwd_ratio', 'ratio_vs_8', 'temp_mb']
  heads = ['layer', 'e', 'c (slots/expert)', 'slots', 'fwd ms', 'fwd+bwd ms',
           'ratio to dense', 'ratio to e=8', 'temp MB']
  md = '\n'.join([
      '### Scaling in the number of experts (fixed active compute)', '',
      common.machine_line(info), '',
      common.markdown_table(rows, cols, heads)])
  name = 'scaling_quick' if quick else 'scaling'
  paths = common.save_results(name, rows, info, md)
  png = os.path.join(common.RESULTS_DIR, f'{name}.png')
  try:
    plot(rows, png)
    md += f'\n\nPlot: `{os.path.relpath(png)}`, CSV: `{os.path.relpath(paths["csv"])}`'
  except ImportError:
    md += '\n\n(matplotlib not installed: no plot)'
  return md, rows, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args()
  print(run(args.quick, args.repeats)[0])


if __name__ == '__main__':
  main()
