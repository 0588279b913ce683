"""The LLaMA decoder in the trainer's machinery: its parameters follow the sharding rules, and a
forward pass and SAFE train steps on sharded meshes of 8 fake devices equal the 1-device ones."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from safe_dist import run_setup
from safe_dist.experiment import DataConfig, Experiment, ModelConfig, TrainConfig
from safe_dist.models.llama import LlamaConfig
from safe_dist.optim import OptimizerConfig
from safe_dist.sharding import MeshConfig, global_batch
from safe_dist.sparsity import SparsifierConfig, find_admm_state

TINY = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
MESHES = {"fsdp2_tensor4": MeshConfig(data=1, fsdp=2, tensor=4),
          "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2)}


def _experiment(mesh: MeshConfig, sparsifier: str = "safe") -> Experiment:
  return Experiment(
      task="next_token", model=ModelConfig(name="llama", llama=TINY),
      data=DataConfig(name="shakespeare", seqlen=17),
      # SGD: Adam would turn float noise in near-zero gradients into full-size steps.
      optimizer=OptimizerConfig(name="sgd", lr=0.1, warmup_epochs=0),
      sparsifier=SparsifierConfig(name=sparsifier, sparsity=0.5, scope="layerwise", lam=1e-2,
                                  dual_update_interval=2, rho=0.05),
      mesh=mesh, train=TrainConfig(batch_size=8, max_steps=10))


def _setup(mesh: MeshConfig, sparsifier: str = "safe"):
  exp = _experiment(mesh, sparsifier)
  devices = jax.devices()[:1] if mesh == MeshConfig(data=1) else None
  return run_setup.setup(exp, devices, info=run_setup.shapes_only_info(exp))


def _batches(count: int):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 256, (8, 17)).astype(np.int32)} for _ in range(count)]


def _train(run, batches):
  """Initial logits, final params and per-step metrics of `batches` SAFE steps."""
  state = run.init(0)
  logits = jax.jit(run.model.apply)({"params": state.params}, batches[0]["tokens"][:, :-1])
  metrics = []
  for batch in batches:
    state, m = run.train_step(state, global_batch(run.mesh, batch))
    metrics.append(m)
  return jax.device_get((logits, state.params, metrics))


@pytest.fixture(scope="module")
def one_device():
  return _train(_setup(MeshConfig(data=1)), _batches(5))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_and_safe_steps_equal_one_device(one_device, mesh):
  run = _setup(MESHES[mesh])
  logits, params, metrics = _train(run, _batches(5))  # 5 steps: dual updates at steps 2 and 4
  np.testing.assert_allclose(logits, one_device[0], atol=2e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4),
               params, one_device[1])
  for got, want in zip(metrics, one_device[2]):
    for key in ("train/loss", "sharpness/sam", "admm/mask_change", "sparsity/z"):
      np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-4, err_msg=key)


def test_parameters_and_safe_state_follow_the_rules_table():
  run = _setup(MESHES["fsdp2_tensor4"])
  specs = jax.tree.map(lambda s: s.spec, run.param_shardings)
  block = specs["layers_0"]
  expected = {  # (in, out) kernels: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor
      "q_proj": P("fsdp", "tensor"), "k_proj": P("fsdp", "tensor"),
      "v_proj": P("fsdp", "tensor"), "o_proj": P("tensor", "fsdp")}
  for name, spec in expected.items():
    assert block["self_attn"][name]["kernel"] == spec, name
  assert block["mlp"]["gate_proj"]["kernel"] == P("fsdp", "tensor")
  assert block["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert block["input_layernorm"]["scale"] in (P(), P(None))
  # SAFE's `a` (= x + u) lives where its parameter lives.
  state = find_admm_state(run.state_shardings.opt_state)
  assert state.a["layers_0"]["mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")
  assert state.a["layers_0"]["self_attn"]["o_proj"]["kernel"].spec == P("tensor", "fsdp")


def test_final_network_of_every_kernel_is_exactly_half_zero():
  run = _setup(MESHES["data2_fsdp2_tensor2"])
  state = run.init(0)
  projected = jax.device_get(run.project(state.params))
  kernels = {jax.tree_util.keystr(path): x for path, x in
             jax.tree_util.tree_flatten_with_path(projected)[0] if x.ndim == 2}
  assert len(kernels) == 7 + 1 + 1  # 7 linears a block, lm_head, the embedding
  for name, x in kernels.items():
    zeros = int((x == 0).sum())
    if "embedding" in name:  # embeddings are never pruned
      assert zeros == 0
    else:
      assert zeros == x.size // 2, name
