"""m-sharpness (--sam_group_size): a float64 loop over groups, the default bit for bit at
m = batch, replicas that never diverge on 8 devices, and the flag's refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safe_dist import data as data_lib
from safe_dist import run_setup, sharding, steps, tasks
from safe_dist.models.lenet import LeNet
from safe_dist.sharding import GroupLayout, MeshConfig
from safe_dist.sparsity import SparsifierConfig
from safe_dist.sparsity.sam import sam_gradient
from safe_dist.train_state import TrainState
from trainer_helpers import abstract_batch, debug_experiment, replace

BATCH, RHO, LR, STEPS = 32, 0.5, 0.2, 3


def _tiny_problem():
  """A 16-8-3 MLP (LeNet's code), its boxed abstract params, params and STEPS batches."""
  rng = np.random.default_rng(0)
  model = LeNet(num_classes=3, mean=(0.0,), std=(1.0,), hidden=(8,))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))["params"]
  params = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32),
                        nn.unbox(boxed))
  batches = [{"image": rng.normal(size=(BATCH, 4, 4, 1)).astype(np.float32),
              "label": rng.integers(0, 3, size=BATCH).astype(np.int32)} for _ in range(STEPS)]
  return model, boxed, params, batches


def _reference(params, batches, group_size):
  """SGD on the mean over groups of grad f_g(x + rho g_g / ||g_g||): a python loop over
  groups in float64 (the MLP written out; each group's SAM gradient jitted)."""

  def loss(p, images, labels):
    h = jax.nn.relu(images.reshape(len(images), -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def group_sam_grad(x, images, labels):
    g = jax.grad(loss)(x, images, labels)
    norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
    return jax.grad(loss)(jax.tree.map(lambda w, v: w + RHO * v / (norm + 1e-12), x, g),
                          images, labels)

  with jax.enable_x64(True):
    sam_grad = jax.jit(group_sam_grad)
    x = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    for batch in batches:
      grads = [jax.device_get(sam_grad(x, batch["image"][i:i + group_size].astype(np.float64),
                                       batch["label"][i:i + group_size]))
               for i in range(0, BATCH, group_size)]
      x = jax.tree.map(lambda w, *gs: w - LR * np.mean(gs, axis=0), x, *grads)
    return x


def _replicas_agree(tree) -> bool:
  """Every fully replicated array holds the same bits on every device."""
  for x in jax.tree.leaves(tree):
    if x.sharding.is_fully_replicated:
      shards = [np.asarray(s.data) for s in x.addressable_shards]
      if not all(np.array_equal(shards[0], s) for s in shards[1:]):
        return False
  return True


@pytest.mark.parametrize("mesh_cfg,group_size", [
    (MeshConfig(), 2),                    # 16 groups, two per device
    (MeshConfig(data=2, fsdp=4), 4),      # 8 groups over data, each group's examples and the
])                                        # fc1 kernel split over fsdp
def test_groups_match_a_float64_loop_over_groups(mesh_cfg, group_size):
  """The jitted, sharded float32 step follows the float64 loop to float32 rounding: after 3
  steps of a 16-8-3 MLP (weights up to ~1.1) the largest difference is ~1e-7, an ulp or two,
  and 2e-6 leaves room for other CPUs' summation orders; the whole-batch SAM trajectory is
  0.07-0.1 away, so the bound tells m-sharpness from plain SAM >1000 times over."""
  model, boxed, initial, batches = _tiny_problem()
  mesh = sharding.make_mesh(mesh_cfg)
  param_shardings = sharding.shardings_for(boxed, mesh)
  params = jax.device_put(initial, param_shardings)
  tx = optax.chain(sam_gradient(RHO), optax.sgd(LR))
  layout = GroupLayout(BATCH // group_size, mesh, param_shardings)
  step = jax.jit(steps.make_train_step(model, tasks.get_task("classification"), tx,
                                       sam_groups=layout))
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params))
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(mesh, batch))
  assert np.isfinite(float(metrics["sharpness/sam"]))
  got = jax.device_get(state.params)
  want = _reference(initial, batches, group_size)
  whole_batch = _reference(initial, batches, BATCH)
  max_diff = lambda a, b: max(float(np.abs(x - y).max())
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert max_diff(got, want) < 2e-6
  assert max_diff(want, whole_batch) > 1000 * 2e-6
  assert _replicas_agree(state)


@pytest.fixture(scope="module")
def debug_runs():
  """4 steps of the debug SAFE run (8 devices) at --sam_group_size 0 and 32 (the batch)."""
  exp = debug_experiment()
  runs = {m: run_setup.setup(replace(exp, "sparsifier", sam_group_size=m)) for m in (0, 32)}
  initial = jax.device_get(runs[0].init(0))
  it = data_lib.train_iterator(exp.data, global_batch_size=exp.train.batch_size, seed=1,
                               process_index=0, process_count=1)
  batches = [next(it) for _ in range(4)]
  states = {}
  for m, run in runs.items():
    state = jax.device_put(initial, run.state_shardings)
    for batch in batches:
      state, _ = run.train_step(state, sharding.global_batch(run.mesh, batch))
    states[m] = state
  return states


def test_group_size_of_the_whole_batch_is_the_default_bit_for_bit(debug_runs):
  for a, b in zip(jax.tree.leaves(debug_runs[0]), jax.tree.leaves(debug_runs[32])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_replicas_never_diverge(debug_runs):
  """Every replicated leaf of the SAFE state (weights, biases, a = x + u, momentum, SAM's
  loss, lambda, ...) holds the same bits on all 8 devices after 4 steps: both gradients are
  means over the global batch (the official pmap code averages only the first one). The
  grouped step's replicas: `test_groups_match_a_float64_loop_over_groups`."""
  assert _replicas_agree(debug_runs[0])


@pytest.mark.parametrize("sparsifier", ["safe", "safe_plus"])
def test_the_trainer_builds_the_grouped_step(sparsifier):
  """setup() wires --sam_group_size into the step (SAFE; SAFE+ with the input norms recorded
  per group): 8 groups of 4 over the 8 devices trace to the state's own shapes (traced only:
  the float64 test runs groups; the LLaMA decoder's grouped step: test_half_precision.py)."""
  run = run_setup.setup(replace(debug_experiment(), "sparsifier", name=sparsifier,
                                sam_group_size=4))
  state, metrics = jax.eval_shape(run.train_step, run.abstract_state, abstract_batch(run))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(state) == shapes(run.abstract_state)
  assert "sharpness/sam" in metrics


@pytest.mark.parametrize("mesh_cfg,group_size,allowed", [
    (MeshConfig(), 3, "allowed: 0, 1, 2, 4, 32"),
    (MeshConfig(), 8, "allowed: 0, 1, 2, 4, 32"),  # 4 groups on 8 data shards
    (MeshConfig(data=2, fsdp=4), 2, "allowed: 0, 4, 8, 16, 32"),  # m not divisible by fsdp
])
def test_group_sizes_that_do_not_lay_out_are_refused(mesh_cfg, group_size, allowed):
  exp = replace(replace(debug_experiment(), "sparsifier", sam_group_size=group_size), "mesh",
                data=mesh_cfg.data, fsdp=mesh_cfg.fsdp)
  with pytest.raises(ValueError, match=f"--sam_group_size {group_size} .*{allowed}$"):
    run_setup.setup(exp)


@pytest.mark.parametrize("fields,message", [
    ({"sam_group_size": -1}, "--sam_group_size must be >= 0"),
    ({"sam_group_size": 4, "name": "admm"}, "--sam_group_size 4 needs a SAM step"),
    ({"sam_group_size": 4, "rho": 0.0}, "--sam_group_size 4 needs a SAM step"),
])
def test_group_size_without_sam_is_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    SparsifierConfig(**fields)


def test_batch_norm_statistics_under_groups():
  """Each group is normalised with its own statistics; the running statistics move by the
  mean over groups of the groups' batch statistics (one device, 4 groups of 8)."""
  from safe_dist.models import layers

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = layers.dense(5, name="fc")(x.reshape(len(x), -1))
      return layers.dense(3, name="head")(nn.relu(layers.batch_norm(train, name="bn")(x)))

  model, batches = Net(), _tiny_problem()[3]
  variables = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 1))))
  tx = optax.chain(sam_gradient(RHO), optax.sgd(LR))
  step = jax.jit(steps.make_train_step(model, tasks.get_task("classification"), tx,
                                       sam_groups=GroupLayout(4)))
  state = TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))
  new_state, _ = step(state, batches[0])
  fc = variables["params"]["fc"]
  h = batches[0]["image"].reshape(4, 8, 16).astype(np.float64) @ fc["kernel"] + fc["bias"]
  stats = new_state.batch_stats["bn"]
  np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(1).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(1).mean(0), rtol=1e-5, atol=1e-6)
