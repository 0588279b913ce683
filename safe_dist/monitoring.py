"""What the trainer watches besides the loss: per-layer sparsity and Hessian sharpness."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from safe_dist import sharpness as sharpness_lib
from safe_dist.sparsity import auxiliary_and_dual, find_admm_state, prunable_tree


def _layer_name(path) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "/".join(n for n in names if n not in ("kernel", "value"))


def prunable_by_layer(params) -> dict[str, jax.Array]:
  """{layer name: kernel} of the prunable kernels, in tree order."""
  flags = jax.tree.leaves(prunable_tree(params))
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_layer_name(path): x for (path, x), f in zip(with_path, flags) if f}


def sparse_iterate(params, opt_state, uses_admm: bool):
  """The sparse variable the method maintains: z for SAFE/ADMM, x itself otherwise."""
  return auxiliary_and_dual(find_admm_state(opt_state))[0] if uses_admm else params


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


def make_sharpness(model, param_shardings, stats_shardings, batch_sharding, replicated,
                   num_iters: int, num_samples: int) -> Callable:
  """One jitted estimator of the Hessian top eigenvalue and trace, sharded like the params."""
  fn = sharpness_lib.make_sharpness_fn(model, num_iters=num_iters, num_samples=num_samples)
  return jax.jit(fn, in_shardings=(param_shardings, stats_shardings, batch_sharding, replicated),
                 out_shardings=replicated)


def sharpness_metrics(estimate: Callable, params, projected, batch_stats, batch, key) -> dict:
  """sharpness/hessian_{max_eig,trace} of x and of Proj(x) (suffix `_projected`)."""
  out = dict(estimate(params, batch_stats, batch, key))
  out.update({f"{k}_projected": v
              for k, v in estimate(projected, batch_stats, batch, key).items()})
  return {k: float(v) for k, v in jax.device_get(out).items()}


def layer_sizes(params) -> dict[str, int]:
  return {k: int(np.prod(v.shape)) for k, v in prunable_by_layer(params).items()}
