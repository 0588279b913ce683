"""The device mesh and the one table that maps logical axis names onto it.

Models name their axes (`conv_in`, `mlp_out`, `batch`, ...); `LOGICAL_RULES` says which mesh
axis shards each name. Parameters, SAFE's `z` and `u`, and optimizer state all follow the
parameter they belong to. A dimension that does not divide evenly over its mesh axes is
replicated instead (small layers such as a 10-way classifier).
"""

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # the global batch is split over both
# m-sharpness (`GroupLayout`): groups of the batch over `data`, a group's examples over `fsdp`
# (so that the per-group parameter copies keep the parameters' fsdp sharding).
GROUP_AXIS, GROUP_MEMBER_AXIS = DATA_AXES

LOGICAL_RULES = (
    ("batch", DATA_AXES),
    ("mlp_in", "fsdp"),
    ("mlp_out", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("conv_height", None),
    ("conv_width", None),
    # LLaMA (safe_dist.models.llama): the model width over fsdp, what the heads, the MLP and
    # the vocabulary split into over tensor (Megatron-style column/row split of each block).
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 takes all remaining devices (default: all on `data`).

  num_devices: use only the first n devices (debug mode uses one).
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  num_devices: Optional[int] = None

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes (mesh.data, mesh.fsdp, mesh.tensor) must be positive, at "
                       f"most one -1; got {tuple(sizes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(f"mesh sizes {tuple(sizes)} do not divide the {num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh sizes {tuple(sizes)} need {math.prod(sizes)} devices, "
                       f"there are {num_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if cfg.num_devices is not None:
    if not 1 <= cfg.num_devices <= len(devices):
      raise ValueError(f"mesh.num_devices must be in [1, {len(devices)}], got {cfg.num_devices}")
    devices = devices[:cfg.num_devices]
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sam_group_sizes(batch_size: int, mesh: Mesh) -> tuple[int, ...]:
  """The group sizes m that m-sharpness can lay out (`GroupLayout`), besides the whole batch:
  m divides the batch into a number of groups divisible by `data`, and `fsdp` divides m."""
  return tuple(m for m in range(1, batch_size) if batch_size % m == 0
               and (batch_size // m) % mesh.shape[GROUP_AXIS] == 0
               and m % mesh.shape[GROUP_MEMBER_AXIS] == 0)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """Where m-sharpness puts its groups: the global batch as `num_groups` groups of m examples,
  the group axis over `data` and a group's examples over `fsdp`. Per-group copies of the
  parameters (the perturbed points, the groups' gradients) add the group axis over `data` to
  their parameter's own sharding: each device holds the copies of its own groups only.

  mesh None: no constraints (one device).
  """
  num_groups: int
  mesh: Optional[Mesh] = None
  param_shardings: Any = None

  def split(self, batch: dict) -> dict:
    """Every leaf (B, ...) as (num_groups, B / num_groups, ...)."""
    split = {k: v.reshape(self.num_groups, -1, *v.shape[1:]) for k, v in batch.items()}
    if self.mesh is None:
      return split
    spec = NamedSharding(self.mesh, P(GROUP_AXIS, GROUP_MEMBER_AXIS))
    return jax.lax.with_sharding_constraint(split, jax.tree.map(lambda _: spec, split))

  def spread(self, stacked: Any) -> Any:
    """A tree like the params with a leading group axis, constrained to the copies' layout."""
    if self.mesh is None:
      return stacked
    shardings = jax.tree.map(
        lambda s: NamedSharding(self.mesh, P(GROUP_AXIS, *s.spec)), self.param_shardings)
    return jax.lax.with_sharding_constraint(stacked, shardings)


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """A global array sharded over the data axes from this process's rows of the batch."""
  spec = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(v))
          for k, v in local_batch.items()}


def _fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide evenly."""
  if spec is None:
    return P()
  dims = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    dims.append(axes if names and dim % size == 0 else None)
  return P(*dims)


def shardings_for(abstract_boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be flax `LogicallyPartitioned` boxes.

  The result has the structure of the unboxed tree; unannotated leaves are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  mesh_specs = nn.logical_to_mesh(specs, LOGICAL_RULES)
  shapes = nn.unbox(abstract_boxed_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def log_sharding_summary(abstract_tree: Any, shardings: Any) -> float:
  """Logs and returns the fraction of parameters (by count) that are split over devices."""
  sizes = [np.prod(x.shape) for x in jax.tree.leaves(abstract_tree)]
  split = [not s.is_fully_replicated for s in jax.tree.leaves(shardings)]
  total = float(sum(sizes)) or 1.0
  frac = sum(n for n, f in zip(sizes, split) if f) / total
  logging.info("sharding: %.1f%% of %d state values are split across devices", 100 * frac, total)
  return frac


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_like_params(abstract_tree: Any, params: Any, param_shardings: Any,
                          mesh: Mesh) -> Any:
  """Shardings for any state tree (optimizer moments, SAFE's z and u, masks, ...).

  A leaf whose path ends with a parameter's path and has that parameter's shape gets the
  parameter's sharding; everything else (counters, scalars, BN statistics) is replicated.
  """
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(param_shardings)):
    by_path[_path_names(path)] = (p.shape, s)

  def choose(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is None or len(hit[0]) != len(leaf.shape):
        continue
      if hit[0] == leaf.shape:
        return hit[1]
      if hit[0][:-1] == leaf.shape[:-1]:  # e.g. a mask bit-packed along the last axis
        return NamedSharding(mesh, _fit_spec(hit[1].spec, leaf.shape, mesh))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(choose, abstract_tree)
