"""The block loop of layer-wise pruning: one transformer block at a time, in order.

As the reference language code (SPEC.md, "Language models"): the calibration windows'
embeddings are block 0's inputs X; for block i, one dense pass gives its targets Y and what
each linear kernel sees of X (input sums of squares; Gram matrices for SparseGPT); the block
is pruned by the method; the pruned block's outputs on X become block i+1's inputs. X and Y
stay on the devices, split over the data axes; the block's kernels are split over
fsdp/tensor as the rules table says. Embeddings, the final norm and the head are not pruned.
"""

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from safe_dist import sharding
from safe_dist.layerwise import safe_block, statistics
from safe_dist.layerwise.sparsegpt import sparsegpt
from safe_dist.layerwise.wanda import wanda
from safe_dist.models.llama import DecoderBlock, Llama
from safe_dist.sparsity import Projection, prunable_tree

METHODS = ("magnitude", "wanda", "sparsegpt", "safe", "safe_plus")


@dataclasses.dataclass(frozen=True)
class LayerwiseConfig:
  """[--prune_method --sparsity_ratio --sparsity_type --seed]; `safe` holds SAFE's own flags.

  chunk: calibration windows per dense pass (bounds the attention's activation memory).
  """
  method: str = "safe"
  sparsity: float = 0.5
  n_m: Optional[tuple[int, int]] = None
  safe: safe_block.SafeBlockConfig = safe_block.SafeBlockConfig()
  seed: int = 0
  chunk: int = 8

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"--prune_method must be one of {', '.join(METHODS)}, got "
                       f"{self.method!r}")
    if self.n_m is None and not 0 <= self.sparsity < 1:
      raise ValueError(f"--sparsity_ratio must be in [0, 1), got {self.sparsity}")
    if self.chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {self.chunk}")


@dataclasses.dataclass
class BlockReport:
  index: int
  seconds: float
  relative_error: float  # ||block_pruned(X) - Y||^2 / ||Y||^2 on the calibration windows


def _by_module(tree) -> dict:
  """{(module path): leaf dict} of a params or recorded-sums tree."""
  out = {}

  def walk(node, path):
    if isinstance(node, dict) and any(not isinstance(v, dict) for v in node.values()):
      out[path] = node
    if isinstance(node, dict):
      for k, v in node.items():
        if isinstance(v, dict):
          walk(v, path + (k,))
  walk(tree, ())
  return out


def _replace_kernels(params, new_kernels: dict):
  """`params` with the kernel of each module path in `new_kernels` replaced."""
  def rebuild(node, path):
    if path in new_kernels:
      return {**node, "kernel": new_kernels[path]}
    return {k: rebuild(v, path + (k,)) if isinstance(v, dict) else v for k, v in node.items()}
  return rebuild(params, ())


class BlockPruner:
  """Prunes the blocks of one model (all blocks share shapes: each function compiles once)."""

  def __init__(self, model: Llama, mesh, block_shardings: Any, cfg: LayerwiseConfig):
    self.cfg, self.mesh, self.block_shardings = cfg, mesh, block_shardings
    self.block = DecoderBlock(model.config, model.dtype)
    self.data = NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXES))
    replicated = sharding.replicated(mesh)
    apply = lambda params, x: self.block.apply({"params": params}, x)
    self._apply = jax.jit(apply, in_shardings=(block_shardings, self.data),
                          out_shardings=self.data)
    self._outputs_and_sums = jax.jit(
        lambda params, x: statistics.block_outputs_and_input_sums(
            self.block, params, x, with_gram=cfg.method == "sparsegpt"),
        in_shardings=(block_shardings, self.data), out_shardings=(self.data, replicated))
    self._projection = Projection(cfg.sparsity, scope=None if cfg.n_m else "layerwise",
                                  n_m=cfg.n_m)
    self._magnitude = jax.jit(self._projection.project_params, in_shardings=(block_shardings,),
                              out_shardings=block_shardings)
    self._kernel_fns: dict = {}
    if cfg.method in safe_block.METHODS:
      safe_cfg = dataclasses.replace(cfg.safe, method=cfg.method, sparsity=cfg.sparsity,
                                     n_m=cfg.n_m)
      self._safe = safe_block.make_block_pruner(
          apply, safe_cfg, param_shardings=block_shardings, data_sharding=self.data)

  def _chunks(self, x: jax.Array):
    return [jax.device_put(x[i:i + self.cfg.chunk], self.data)
            for i in range(0, x.shape[0], self.cfg.chunk)]

  def outputs(self, params, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self._apply(params, c) for c in self._chunks(x)])

  def dense_pass(self, params, x: jax.Array):
    """(Y, summed input statistics of every linear kernel) of the dense block on X."""
    ys, total = [], None
    for c in self._chunks(x):
      y, sums = self._outputs_and_sums(params, c)
      ys.append(y)
      total = statistics.add(total, sums)
    return jnp.concatenate(ys), total

  def _kernel_fn(self, shard):
    """The jitted per-kernel pruning of Wanda / SparseGPT for kernels with sharding `shard`
    (jit compiles once per kernel shape)."""
    key = shard
    if key not in self._kernel_fns:
      cfg = self.cfg
      if cfg.method == "wanda":
        fn = lambda w, s: wanda(w, s["sq_sum"], cfg.sparsity, cfg.n_m, sharding=shard)[0]
      else:  # H = (2 / n) sum x x^T, the reference's normalisation
        fn = lambda w, s: sparsegpt(w, 2.0 * s["gram"] / s["count"], cfg.sparsity, cfg.n_m,
                                    sharding=shard)[0]
      self._kernel_fns[key] = jax.jit(fn, out_shardings=shard)
    return self._kernel_fns[key]

  def prune(self, params, x: jax.Array, key: jax.Array):
    """(pruned params of this block, its outputs on X, the relative reconstruction error)."""
    method = self.cfg.method
    y, sums = self.dense_pass(params, x)
    if method == "magnitude":
      pruned = self._magnitude(params)
    elif method in ("wanda", "sparsegpt"):
      modules, shards = _by_module(params), _by_module(self.block_shardings)
      recorded = _by_module(sums)
      pruned = _replace_kernels(params, {
          path: self._kernel_fn(shards[path]["kernel"])(node["kernel"], recorded[path])
          for path, node in modules.items() if "kernel" in node})
    else:
      norms = None
      if method == "safe_plus":  # s_j: the mean over calibration tokens of x_j^2
        norms = _replace_kernels(params, {path: s["sq_sum"] / s["count"]
                                          for path, s in _by_module(sums).items()})
      pruned, _ = self._safe(params, x, y, key, norms)
    out = self.outputs(pruned, x)
    error = float(jnp.sum(jnp.square(out - y)) / jnp.maximum(jnp.sum(jnp.square(y)), 1e-30))
    return pruned, out, error


def prune_llama(model: Llama, params, tokens: jax.Array, cfg: LayerwiseConfig, mesh,
                param_shardings: Any,
                on_block: Callable[[BlockReport], None] = lambda report: None):
  """The model's params with every block pruned (in order), and a report per block.

  tokens: (nsamples, seqlen) calibration windows, split over the data axes.
  """
  embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method=Llama.embed),
                  in_shardings=(param_shardings, None),
                  out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec(
                      sharding.DATA_AXES)))
  x = embed(params, tokens)
  pruner = BlockPruner(model, mesh, param_shardings["layers_0"], cfg)
  key = jax.random.PRNGKey(cfg.seed)
  params = dict(params)
  reports = []
  for i in range(model.config.num_hidden_layers):
    start = time.time()
    name = f"layers_{i}"
    params[name], x, error = pruner.prune(params[name], x, jax.random.fold_in(key, i))
    jax.block_until_ready(x)
    reports.append(BlockReport(i, time.time() - start, error))
    on_block(reports[-1])
  return params, reports


def kernel_sparsity(params) -> tuple[float, dict]:
  """(fraction of zeros over all prunable kernels of the blocks, {path: fraction per kernel})."""
  flags = jax.tree.leaves(prunable_tree(params))
  per_kernel, zeros, size = {}, 0, 0
  for (path, x), prunable in zip(jax.tree_util.tree_flatten_with_path(params)[0], flags):
    name = jax.tree_util.keystr(path)
    if prunable and "layers_" in name:
      count = int(np.sum(np.asarray(jax.device_get(x)) == 0))
      per_kernel[name] = count / x.size
      zeros, size = zeros + count, size + x.size
  return zeros / max(size, 1), per_kernel
