"""Sparsifiers as optax transformations, and the exact projection they share."""

from safe_dist.sparsity.admm import (ADMMState, admm, admm_variables, auxiliary_and_dual,
                                     find_admm_state)
from safe_dist.sparsity.importance import IMPORTANCE_SOURCES
from safe_dist.sparsity.factory import SPARSIFIERS, SparsifierConfig, make_optimizer
from safe_dist.sparsity.metrics import sparse_iterate, sparsifier_metrics
from safe_dist.sparsity.projection import (Projection, prunable_leaves, prunable_shardings,
                                           prunable_tree, stat_dtype, weight_sparsity)
from safe_dist.sparsity.topk import SCOPES, prune_mask
from safe_dist.sparsity.baselines import MaskState, gmp, iht, one_shot_magnitude
from safe_dist.sparsity.sam import SAMState, group_mean, sam_gradient
from safe_dist.sparsity.schedules import penalty_schedule, sparsity_schedule
