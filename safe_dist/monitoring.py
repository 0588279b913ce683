"""What the trainer watches besides the loss: per-layer sparsity and Hessian sharpness."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from safe_dist import sharpness as sharpness_lib
from safe_dist import distributed
from safe_dist.sparsity import prunable_tree


def _layer_name(path) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "/".join(n for n in names if n not in ("kernel", "value"))


def prunable_by_layer(params) -> dict[str, jax.Array]:
  """{layer name: kernel} of the prunable kernels, in tree order."""
  flags = jax.tree.leaves(prunable_tree(params))
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_layer_name(path): x for (path, x), f in zip(with_path, flags) if f}


def per_layer_sparsity(tree) -> dict[str, float]:
  """Fraction of exact zeros of each prunable kernel (a few tiny reductions, then host)."""
  kernels = prunable_by_layer(tree)
  fractions = jax.device_get({k: jnp.mean(v == 0) for k, v in kernels.items()})
  return {k: float(v) for k, v in fractions.items()}


def sparsity_table(z_sparsity: dict[str, float], sizes: dict[str, int]) -> str:
  """Markdown table of per-layer sparsity (TensorBoard renders text summaries as markdown)."""
  rows = ["| layer | weights | sparsity |", "|---|---:|---:|"]
  rows += [f"| {k} | {sizes[k]:,} | {v:.2%} |" for k, v in z_sparsity.items()]
  return "\n".join(rows)


def sharpness_of_iterates(probe: sharpness_lib.HessianProbe, params, projected, batch_stats,
                          batch, key, *, budget_seconds: Optional[float],
                          hvp_seconds_estimate: Optional[float] = None,
                          should_stop: Callable[[], bool]) -> dict[str, float]:
  """sharpness/hessian_{max_eig,trace} of x and of Proj(x) (suffix `_projected`), within
  `budget_seconds` together (None: no limit); estimators cut or skipped to fit are absent.
  `hvp_seconds_estimate` lets a measurement that cannot fit skip before compiling.

  Raises `distributed.Interrupted` when `should_stop()` turns True during a measurement.
  """
  out, spent = {}, 0.0
  for tree, suffix, share in ((params, "", 0.5), (projected, "_projected", 1.0)):
    budget = None if budget_seconds is None else share * budget_seconds - spent
    measured = probe.measure(tree, batch_stats, batch, key, budget_seconds=budget,
                             hvp_seconds_estimate=hvp_seconds_estimate,
                             should_stop=should_stop, label="x" + suffix)
    if measured.status == "interrupted":
      raise distributed.Interrupted("stop requested during the sharpness measurement")
    out.update({k + suffix: v for k, v in measured.values.items()})
    # Every process must budget the second measurement alike: process 0's time counts.
    spent += float(distributed.from_first_process(np.array([measured.seconds]))[0])
  return out


def layer_sizes(params) -> dict[str, int]:
  return {k: int(np.prod(v.shape)) for k, v in prunable_by_layer(params).items()}
