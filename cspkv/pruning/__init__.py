"""The pruning algorithm, free of transformers: `CSPConfig`, per-row budget plans, the
policies, selection and compaction, joined in one `prune_layer`."""

from .budget import RowPlan, plan_batch, window_query_ids
from .config import CSPConfig
from .allocation import head_budgets, layer_budgets, layer_plans
from .pipeline import PrunedKV, head_allocation, prune_layer, prune_stored, score_layer, select_and_compact

__all__ = ["CSPConfig", "RowPlan", "plan_batch", "window_query_ids", "PrunedKV", "prune_layer", "prune_stored", "score_layer",
           "select_and_compact", "head_allocation", "head_budgets", "layer_budgets", "layer_plans"]
