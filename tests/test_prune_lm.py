"""Layer-wise pruning of a whole (tiny) LLaMA: the block loop on 8 fake devices equals the
1-device loop for every method, every kernel ends at the exact target, and the command line
writes a pruned model that `lm_eval` reads back to the same perplexity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from hf_checkpoints import random_weights, write_hf
from helpers import run_module
from safe_dist import sharding
from safe_dist.layerwise import pruner
from safe_dist.layerwise.safe_block import SafeBlockConfig
from safe_dist.lm import pretrained
from safe_dist.models.llama import Llama

TINY = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4,
            rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
SAFE = SafeBlockConfig(epochs=2, warmup_epochs=0.5, interval=2, learning_rate=1e-3,
                       batch_size=8)
CASES = [("magnitude", None), ("wanda", (2, 4)), ("sparsegpt", None), ("safe", None),
         ("safe_plus", (2, 4))]


def _byte_tokenizer(path):
  """A byte-level BPE without merges: 256 tokens, one per byte."""
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, []))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.save(str(path))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny_hf")
  write_hf(directory, TINY, random_weights(TINY))
  _byte_tokenizer(directory / "tokenizer.json")
  return str(directory)


def _prune(model_dir, mesh_cfg, method, n_m):
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1] if mesh_cfg.data == 1 else None)
  loaded = pretrained.load_pretrained(model_dir, mesh)
  model = Llama(loaded.config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  shardings = sharding.shardings_for(boxed["params"], mesh)
  tokens = np.random.default_rng(0).integers(0, 256, (16, 24)).astype(np.int32)
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  cfg = pruner.LayerwiseConfig(method=method, sparsity=0.5, n_m=n_m, safe=SAFE)
  params, reports = pruner.prune_llama(model, loaded.params, tokens, cfg, mesh, shardings)
  return jax.device_get(params), reports


@pytest.mark.parametrize("method,n_m", CASES)
def test_sharded_block_loop_equals_one_device_and_hits_the_target(tiny_model, method, n_m):
  one, one_reports = _prune(tiny_model, sharding.MeshConfig(data=1), method, n_m)
  eight, _ = _prune(tiny_model, sharding.MeshConfig(data=2, fsdp=2, tensor=2), method, n_m)
  if method.startswith("safe"):
    # Up to Adam's float noise: a tiny gradient whose rounding flips its sign moves a weight
    # by up to lr per step either way, which can swap a near-tie at the mask's threshold.
    # How many swap depends on the host's float code: SAFE+ (whose scores also carry the
    # sharded activation norms' rounding) swapped 4 pairs of a 512-weight kernel (1.6%) on one
    # machine, under 1% on others; a wrong reduction would move a large share of the mask.
    steps = SAFE.epochs * 16 // SAFE.batch_size
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
      both = (a != 0) & (b != 0)
      assert np.mean((a == 0) != (b == 0)) <= 0.03
      np.testing.assert_allclose(a[both], b[both], atol=steps * SAFE.learning_rate, rtol=1e-4)
  else:  # the same decisions and weights
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a == 0, b == 0), eight, one)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), eight, one)
  overall, per_kernel = pruner.kernel_sparsity(one)
  assert len(per_kernel) == 2 * 7 and overall == 0.5
  assert all(v == 0.5 for v in per_kernel.values())
  if n_m:  # 2 of every 4 consecutive inputs kept, per output
    w = one["layers_1"]["mlp"]["down_proj"]["kernel"]
    groups = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
    assert (groups == 2).all()
  assert all(0 < r.relative_error < 1 for r in one_reports)


def test_prune_lm_writes_a_model_lm_eval_reads_back(tiny_model, tmp_path):
  out = tmp_path / "pruned"
  args = ["--model", tiny_model, "--prune_method", "safe", "--activation", "--nsamples", "8",
          "--seqlen", "32", "--epochs", "1", "--warmup_epochs", "0", "--interval", "1",
          "--eval_seqlen", "32", "--eval_max_windows", "16", "--mesh", "2,2,2",
          "--out", str(out)]
  proc = run_module("safe_dist.prune_lm", args, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "block 2/2" in proc.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["prune_method"] == "safe_plus" and summary["weight_sparsity"] == 0.5
  assert set(summary["per_layer_sparsity"].values()) == {0.5}
  assert len(summary["block_seconds"]) == 2 and summary["dense_perplexity"] > 0
  result = tmp_path / "ppl.json"
  proc = run_module("safe_dist.lm_eval", ["--model", str(out), "--seqlen", "32",
                                          "--max_windows", "16", "--out", str(result)],
                    cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(json.loads(result.read_text())["perplexity"],
                             summary["perplexity"], rtol=1e-5)
  # A second run into the same --out is refused before any work; nothing there changes.
  before = (out / "summary.json").read_text()
  proc = run_module("safe_dist.prune_lm", args, cwd=tmp_path)
  assert proc.returncode == 2 and "--out" in proc.stderr
  assert (out / "summary.json").read_text() == before


@pytest.mark.parametrize("args,flag", [
    (["--sparsity_type", "3:8"], "--sparsity_type"),
    (["--nsamples", "12"], "--nsamples"),  # not a multiple of --batch_size 8
])
def test_bad_flags_stop_before_any_work(tmp_path, args, flag):
  proc = run_module("safe_dist.prune_lm", ["--model", "smollm2-135m", "--out",
                                           str(tmp_path / "o"), *args], cwd=tmp_path)
  assert proc.returncode == 2 and flag in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "o").exists()
