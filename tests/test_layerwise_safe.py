"""SAFE and SAFE+ on one LLaMA block: Adam without SAM and penalty, SAFE+ with uniform norms,
exact per-kernel counts and N:M groups, a smaller reconstruction error than magnitude
pruning, and the same result on 8 fake devices as on one."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from numpy_reference import keep_mask_global
from safe_dist.layerwise.safe_block import SafeBlockConfig, make_block_pruner, prune_block
from safe_dist.models.llama import DecoderBlock, LlamaConfig
from safe_dist.sharding import DATA_AXES, MeshConfig, make_mesh, shardings_for

TINY = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2)
BLOCK = DecoderBlock(TINY)
NSAMPLES, SEQLEN = 16, 16
# 30 epochs of 2 steps, dual updates every 8 steps
SAFE = SafeBlockConfig(sparsity=0.5, lam=1e-3, rho=1e-3, interval=8, learning_rate=1e-3)
NM = SafeBlockConfig(n_m=(2, 4), lam=1e-3, rho=1e-3, interval=8, learning_rate=1e-3, epochs=8)
KEY = jax.random.PRNGKey(2)


def block_apply(params, x):
  return BLOCK.apply({"params": params}, x)


def _kernels(params):
  return {"/".join(k.key for k in path): np.asarray(w)
          for path, w in jax.tree_util.tree_flatten_with_path(params)[0] if w.ndim == 2}


def _mse(params, x, y):
  return float(jnp.mean(jnp.square(jax.jit(block_apply)(params, x) - y)))


@pytest.fixture(scope="module")
def data():
  """(params, inputs, dense targets)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (NSAMPLES, SEQLEN, TINY.hidden_size))
  params = nn.unbox(BLOCK.init(jax.random.PRNGKey(0), x[:1]))["params"]
  return params, x, jax.jit(block_apply)(params, x)


@pytest.fixture(scope="module")
def noisy_targets(data):
  """Targets the block cannot reach exactly. From the dense targets the first gradients are
  float noise, which Adam scales up to full steps: runs that round differently (another
  program, another mesh) then part ways."""
  return data[2] + 0.01 * jax.random.normal(jax.random.PRNGKey(3), data[2].shape)


@pytest.fixture(scope="module")
def safe_result(data):
  return jax.device_get(make_block_pruner(block_apply, SAFE)(*data, KEY))


@pytest.fixture(scope="module")
def nm_pruner():
  return make_block_pruner(block_apply, NM)


@pytest.fixture(scope="module")
def nm_result(data, nm_pruner):
  return jax.device_get(nm_pruner(*data, KEY))


@pytest.fixture(scope="module")
def nm_noisy(data, noisy_targets, nm_pruner):
  return jax.device_get(nm_pruner(data[0], data[1], noisy_targets, KEY))


def test_without_sam_and_penalty_safe_is_adam(data, noisy_targets):
  cfg = SafeBlockConfig(n_m=(2, 4), lam=0.0, rho=0.0, learning_rate=1e-3, epochs=4,
                        warmup_epochs=1, beta1=0.8, beta2=0.9)
  params, x, _ = data
  y, b = noisy_targets, cfg.batch_size
  got, stats = make_block_pruner(block_apply, cfg, finish=False)(params, x, y, KEY)

  steps_per_epoch = warmup = NSAMPLES // b  # one warm-up epoch
  total = cfg.epochs * steps_per_epoch
  lr = lambda t: 1e-3 * jnp.where(t < warmup, t / warmup, 1 - (t - warmup) / (total - warmup))
  tx = optax.adam(lr, b1=0.8, b2=0.9, eps=1e-8)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, i: jnp.mean(jnp.square(block_apply(p, x[i]) - y[i]))))
  want, opt_state, losses = params, tx.init(params), []
  for epoch in range(cfg.epochs):
    order = jax.random.permutation(jax.random.fold_in(KEY, epoch), NSAMPLES)
    for i in range(steps_per_epoch):
      loss, grads = grad_fn(want, order[b * i:b * (i + 1)])
      updates, opt_state = tx.update(grads, opt_state, want)
      want, losses = optax.apply_updates(want, updates), losses + [loss]
  np.testing.assert_allclose(stats["loss"], losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)
  assert np.all(_kernels(got)["mlp/up_proj/kernel"] != 0)  # trained, not projected


def test_safe_plus_with_uniform_norms_is_safe(data, noisy_targets, nm_noisy):
  params, x, _ = data
  # s = 4 at every input: scores 2 |w| rank exactly as |w|. A tree of the kernels only;
  # (in,) and (in, 1) shapes are both accepted.
  attn = ("q_proj", "k_proj", "v_proj", "o_proj")
  norms = {"self_attn": {k: {"kernel": jnp.full((TINY.hidden_size,), 4.0)} for k in attn},
           "mlp": {k: {"kernel": jnp.full((w["kernel"].shape[0], 1), 4.0)}
                   for k, w in params["mlp"].items()}}
  safe_plus = make_block_pruner(block_apply, dataclasses.replace(NM, method="safe_plus"))
  got = jax.device_get(safe_plus(params, x, noisy_targets, KEY, norms))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), got, nm_noisy)
  # s_j 1e6 at the first two inputs of every four, 1e-6 at the others: 2:4 keeps those two
  favoured = jax.tree.map(lambda s: jnp.where(jnp.arange(s.shape[0]) % 4 < 2, 1e6, 1e-6)
                          .reshape(s.shape), norms)
  for name, w in _kernels(safe_plus(params, x, noisy_targets, KEY, favoured)[0]).items():
    np.testing.assert_array_equal(w[np.arange(w.shape[0]) % 4 >= 2], 0, err_msg=name)
  with pytest.raises(ValueError, match="input_sq_norms"):
    make_block_pruner(block_apply, NM)(*data, KEY, norms)
  del norms["mlp"]["up_proj"]
  with pytest.raises(ValueError, match="mlp/up_proj/kernel"):
    safe_plus(*data, KEY, norms)


def _magnitude(params, sparsity=0.5):
  """Per-kernel magnitude pruning, from the float64 numpy reference."""
  def prune(w):
    if w.ndim < 2:
      return w
    return w * keep_mask_global([np.abs(w)], int(np.floor(sparsity * w.size)))[0]
  return jax.tree.map(prune, jax.device_get(params))


def test_safe_prunes_each_kernel_exactly_and_beats_magnitude(data, safe_result):
  pruned, stats = safe_result
  for name, w in _kernels(pruned).items():
    assert np.sum(w == 0) == w.size // 2, name
  assert np.all(pruned["input_layernorm"]["scale"] != 1)  # trained, never pruned
  error = _mse(pruned, *data[1:])
  np.testing.assert_allclose(stats["mse"], error, rtol=1e-4)
  assert stats["mse_trained"] < stats["mse"]
  assert error < 0.8 * _mse(_magnitude(data[0]), *data[1:])
  assert stats["loss"].shape == (SAFE.epochs * NSAMPLES // 8,) and stats["loss"][0] < 1e-12


def test_safe_n_m_keeps_n_of_every_m_inputs(data, nm_result):
  for name, w in _kernels(nm_result[0]).items():
    groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    np.testing.assert_array_equal(np.sum(groups != 0, axis=1), 2, err_msg=name)


def test_sharded_equals_one_device(data, noisy_targets, nm_noisy):
  params, x, _ = data
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  boxed = jax.eval_shape(lambda: BLOCK.init(jax.random.PRNGKey(0), x[:1]))["params"]
  param_shardings = shardings_for(boxed, mesh)
  assert param_shardings["mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
  data_sharding = NamedSharding(mesh, P(DATA_AXES))
  got = prune_block(block_apply, jax.device_put(params, param_shardings),
                    jax.device_put(x, data_sharding), jax.device_put(noisy_targets, data_sharding),
                    NM, KEY, param_shardings=param_shardings, data_sharding=data_sharding)
  jax.tree.map(lambda w, s: assert_sharded(w, s), got[0], param_shardings)
  (pruned, stats), (want, want_stats) = jax.device_get(got), nm_noisy
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a == 0, b == 0), pruned, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), pruned, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), stats, want_stats)


def assert_sharded(array, sharding):
  assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)


@pytest.mark.parametrize("field,value,flag", [("lam", -1.0, "--lmda"), ("rho", -0.1, "--rho"),
                                              ("interval", 0, "--interval"),
                                              ("learning_rate", 0.0, "--learning_rate"),
                                              ("epochs", 0, "--epochs"),
                                              ("warmup_epochs", 31, "--warmup_epochs"),
                                              ("batch_size", 0, "--batch_size"),
                                              ("beta2", 1.0, "--beta2"),
                                              ("sparsity", 1.0, "--sparsity_ratio"),
                                              ("n_m", (4, 4), "--sparsity_type"),
                                              ("method", "wanda", "--activation")])
def test_config_errors_name_the_flag(field, value, flag):
  with pytest.raises(ValueError, match=flag):
    SafeBlockConfig(**{field: value})


def test_batches_must_tile_the_samples():
  with pytest.raises(ValueError, match="--nsamples"):
    SafeBlockConfig().steps_per_epoch(12)
