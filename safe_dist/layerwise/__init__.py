"""Layer-wise post-training pruning of language models: one kernel and its input statistics."""

from safe_dist.layerwise.sparsegpt import sparsegpt
from safe_dist.layerwise.wanda import wanda
