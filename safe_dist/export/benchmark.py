"""Inference with the pruned kernels as BCOO matrices against dense, on the CPU.

Every `nn.Dense` of the model is intercepted and computes `x @ kernel` with the kernel a
`jax.experimental.sparse.BCOO` (the dense kernels are not passed at all); everything else
runs as in the model. Reported per batch size: the median wall time of a jitted forward,
the bytes of the weights it takes, XLA's scratch memory of the compiled forward, and how far
its logits are from dense. Unstructured sparse matmuls are gathers and scatters on a CPU:
expect them to be slower than dense BLAS at moderate sparsity; the weights are smaller.
"""

import dataclasses
import functools
import resource
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import sparse

from safe_dist.export import codecs
from safe_dist.export.network import Network
from safe_dist.sparsity import prunable_tree

# Models whose pruned kernels are all dense layers (convolutions stay dense here).
MODELS = ("LeNet300-100", "llama")


def check(model: str) -> None:
  if model not in MODELS:
    raise ValueError(f"--benchmark runs models whose pruned layers are all dense layers "
                     f"({', '.join(MODELS)}); the run is a {model}")


@dataclasses.dataclass(frozen=True)
class Measurement:
  weights: str  # "dense" or "bcoo"
  batch_size: int
  seconds: float  # median wall time of one forward
  weight_bytes: int  # of every parameter the forward takes
  temp_bytes: int  # XLA's scratch memory of the compiled forward
  max_abs_diff: float  # of its logits from dense
  argmax_agreement: float  # fraction of predictions equal to dense's


def split_kernels(params) -> tuple[dict, dict]:
  """({module path: BCOO kernel} of the prunable kernels, params with those set to None)."""
  kernels = {}

  def take(path, x, prunable):
    if not prunable:
      return x
    kernels[tuple(k.key for k in path[:-1])] = codecs.to_bcoo(codecs.bcoo_encode(x))
    return None
  rest = jax.tree_util.tree_map_with_path(take, params, prunable_tree(params))
  return kernels, rest


def sparse_apply(model: nn.Module, kernels: dict, variables: dict, inputs):
  """`model.apply(variables, inputs)` with each dense layer's kernel from `kernels`."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    kernel, x = kernels[module.path], args[0]
    if module.dtype is not None:
      x = x.astype(module.dtype)
      kernel = sparse.BCOO((kernel.data.astype(module.dtype), kernel.indices),
                           shape=kernel.shape)
    y = x @ kernel
    return y + module.variables["params"]["bias"] if module.use_bias else y

  with nn.intercept_methods(intercept):
    return model.apply(variables, inputs, train=False)


def _inputs(network: Network, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  shape = (batch_size, *network.info.input_shape)
  if network.is_language_model:
    return rng.integers(0, network.info.num_classes, shape).astype(np.int32)
  return rng.random(shape, np.float32)


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _measure(fn, args, repeats: int):
  """(outputs, median seconds, scratch bytes) of the jitted `fn` on `args`."""
  compiled = fn.lower(*args).compile()
  out = jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return np.asarray(out), statistics.median(times), compiled.memory_analysis().temp_size_in_bytes


def run(network: Network, batch_sizes, repeats: int = 20, seed: int = 0) -> list[Measurement]:
  """Dense and BCOO forwards of `network` on the CPU, per batch size."""
  cpu = jax.devices("cpu")[0]
  model = network.model()
  rng = np.random.default_rng(seed)
  with jax.default_device(cpu):
    variables = jax.device_put(network.variables(), cpu)
    kernels, rest = split_kernels(network.params)
    sparse_variables = {**variables, "params": rest}
    dense_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    sparse_fn = jax.jit(functools.partial(sparse_apply, model))
    out = []
    for batch_size in batch_sizes:
      x = jax.device_put(_inputs(network, batch_size, rng), cpu)
      dense, dense_s, dense_temp = _measure(dense_fn, (variables, x), repeats)
      bcoo, bcoo_s, bcoo_temp = _measure(sparse_fn, (kernels, sparse_variables, x), repeats)
      agreement = float(np.mean(dense.argmax(-1) == bcoo.argmax(-1)))
      out.append(Measurement("dense", batch_size, dense_s, _nbytes(variables), dense_temp,
                             0.0, 1.0))
      out.append(Measurement("bcoo", batch_size, bcoo_s,
                             _nbytes(kernels) + _nbytes(sparse_variables), bcoo_temp,
                             float(np.abs(bcoo - dense).max()), agreement))
  return out


def peak_rss_bytes() -> int:
  """The process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(measurements: list[Measurement]) -> str:
  dense = {m.batch_size: m for m in measurements if m.weights == "dense"}
  lines = [f"{'weights':>7} {'batch':>6} {'ms/forward':>11} {'vs dense':>9} "
           f"{'weight bytes':>13} {'scratch bytes':>14} {'max |diff|':>11} {'argmax =':>9}"]
  for m in measurements:
    lines.append(f"{m.weights:>7} {m.batch_size:>6} {m.seconds * 1e3:>11.3f} "
                 f"{m.seconds / dense[m.batch_size].seconds:>8.2f}x {m.weight_bytes:>13,} "
                 f"{m.temp_bytes:>14,} {m.max_abs_diff:>11.2e} {m.argmax_agreement:>9.2%}")
  return "\n".join(lines)
