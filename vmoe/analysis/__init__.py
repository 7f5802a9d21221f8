"""Routing analysis: pure functions from a trained model and data to numpy
arrays and pandas frames (plots belong to the notebooks).

  from vmoe import analysis
  run = analysis.load('/tmp/vmoe_b16_digits')           # config + checkpoint
  trace = analysis.collect(run.model, analysis.eval_batches(run.config))
  analysis.layer_summary(trace)      # dropped fraction, entropy, unused, ...
  analysis.expert_load(trace)        # tokens and gate mass per expert
  analysis.specialization(trace)     # expert-by-class NMI per layer
  analysis.expert_maps(trace, 0)     # expert of every patch of image 0
  analysis.capacity_sweep(run, [0.5, 1.0, 2.0])   # with / without BPR
  analysis.expert_ablation(run.model, analysis.eval_batches(run.config))
  analysis.fewshot_accuracy(run)     # n-shot ridge on frozen pre-logits
  analysis.forced_accuracy(run.model, batches, off={3: [5]}, classes=[7])
  analysis.targeted_ablation(run.model, batches)   # MoTE's check
  analysis.budget_sweep(run, [0.25, 0.5, 1.0])     # nested experts
  analysis.layer_report(run)         # which layers to keep as MoE (ViMoE)

Modules: loading (workdirs, eval batches), trace (per-token routing of every
MoE layer), statistics (load, drops, entropy, unused experts), specialization
(class usage, NMI, routing change between checkpoints), patch_maps (per-patch
expert maps, Soft MoE weights and slot similarity), capacity (capacity sweep
with and without BPR), ablation (experts switched off), batch_dependence,
runs (training runs, their FLOPs and few-shot accuracy), claims (verdicts of
published claims from measured values, and the declared claims), study
(what those claims measure on a run), forcing (experts forced on / off per
class or image; targeted against random ablation), budget (a nested-experts
model at several compute budgets; `python -m vmoe.analysis.budget`), report
(the layer-placement report, `python -m vmoe.analysis.report`).
"""

from vmoe.analysis import claims
from vmoe.analysis.ablation import expert_ablation, without_experts
from vmoe.analysis.batch_dependence import batch_dependence, per_image_groups
from vmoe.analysis.capacity import capacity_sweep
from vmoe.analysis.forcing import (distinctive_experts, forced_accuracy,
                                   targeted_ablation)
from vmoe.analysis.loading import (Trained, checkpoint_steps,
                                   config_from_workdir, eval_batches,
                                   from_params, initialized, load)
from vmoe.analysis.patch_maps import (SoftMaps, expert_maps, slot_similarity,
                                      soft_maps)
from vmoe.analysis.runs import (fewshot_accuracy, read_metrics, run_summary,
                                train, train_flops_per_step)
from vmoe.analysis.specialization import (class_usage,
                                          normalized_mutual_information,
                                          routing_change, specialization)
from vmoe.analysis.statistics import (dropped_per_image, expert_load,
                                      layer_summary, unused_experts)
from vmoe.analysis.trace import LayerTrace, Trace, collect, token_view


# The command modules (`python -m vmoe.analysis.report` / `.budget`) are
# imported on first use, so that running them does not import them twice.
def budget_sweep(*args, **kwargs):
  """`vmoe.analysis.budget.budget_sweep`."""
  from vmoe.analysis import budget  # pylint: disable=g-import-not-at-top
  return budget.budget_sweep(*args, **kwargs)


def layer_report(*args, **kwargs):
  """`vmoe.analysis.report.layer_report`."""
  from vmoe.analysis import report  # pylint: disable=g-import-not-at-top
  return report.layer_report(*args, **kwargs)
