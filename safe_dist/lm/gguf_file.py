"""GGUF files (llama.cpp's format) of the llama architecture: config, weights and tokenizer.

Tensors are dequantized to float32 by the `gguf` package one at a time, turned into Hugging
Face's layout (rows = out, cols = in) and placed by `hf.place_params`. llama.cpp's converter
interleaves the two rotary halves of every q and k head; loading undoes that, so the weights
are those of the Hugging Face checkpoint for our rotate-half model.
"""

import functools
import os
import re
from typing import Any

import gguf
import numpy as np
import tokenizers
from jax.sharding import Mesh

from safe_dist.lm import hf
from safe_dist.models.llama import LlamaConfig

ARCHITECTURE = "llama"
TOKENIZER_MODEL = "gpt2"  # byte-level BPE
# llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`) that tokenizers' ByteLevel regex
# reproduces: GPT-2's regex, or GPT-2's regex after splitting every digit apart.
_GPT2_PRE = ("gpt-2", "mpt", "olmo", "jais")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell")

_REQUIRED = object()  # the default of metadata fields that must be present

_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
  """A Hugging Face tensor name -> llama.cpp's (`model.layers.3.mlp.up_proj.weight` ->
  `blk.3.ffn_up.weight`)."""
  if hf_name in _TOP_NAMES:
    return _TOP_NAMES[hf_name]
  block, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name).groups()
  return f"blk.{block}.{_BLOCK_NAMES[module]}.weight"


def open_file(path: str) -> gguf.GGUFReader:
  """The file's reader, kept while the file is unchanged (a real vocabulary's metadata takes
  seconds to parse, and the config, tokenizer and weights are read separately)."""
  return _open(os.path.abspath(path), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open(path: str, mtime_ns: int) -> gguf.GGUFReader:
  del mtime_ns  # part of the cache key only
  reader = gguf.GGUFReader(path)
  architecture = _field(reader, "general.architecture")
  if architecture != ARCHITECTURE:
    raise ValueError(f"{path}: architecture {architecture!r} is not supported; only "
                     f"{ARCHITECTURE!r} GGUF files are")
  return reader


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  field = reader.get_field(key)
  if field is not None:
    return field.contents()
  if default is _REQUIRED:
    raise ValueError(f"{reader.data.filename}: no metadata field {key}")
  return default


def _shortest_decimal(x: float) -> float:
  """The float32 metadata value as written (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(x)))


def read_config(path: str) -> LlamaConfig:
  reader = open_file(path)

  def arch(key, default=_REQUIRED):
    return _field(reader, f"{ARCHITECTURE}.{key}", default)

  if arch("rope.scaling.type", "none") != "none":
    raise ValueError(f"{path}: scaled rotary positions are not supported")
  names = {t.name for t in reader.tensors}
  config = LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
      hidden_size=arch("embedding_length"),
      intermediate_size=arch("feed_forward_length"),
      num_hidden_layers=arch("block_count"),
      num_attention_heads=arch("attention.head_count"),
      num_key_value_heads=arch("attention.head_count_kv", arch("attention.head_count")),
      head_dim=arch("attention.key_length", None),
      rope_theta=_shortest_decimal(arch("rope.freq_base", 10000.0)),
      rms_norm_eps=_shortest_decimal(arch("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings="output.weight" not in names,
      max_position_embeddings=arch("context_length", 2048))
  if arch("rope.dimension_count", config.dims_per_head) != config.dims_per_head:
    raise ValueError(f"{path}: rotary positions on part of each head are not supported")
  return config


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer rebuilt from the vocabulary and merges in the metadata."""
  reader = open_file(path)
  model = _field(reader, "tokenizer.ggml.model")
  pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
  if model != TOKENIZER_MODEL:
    raise ValueError(f"{path}: tokenizer.ggml.model {model!r} is not supported; only "
                     f"{TOKENIZER_MODEL!r} (byte-level BPE) is. Use a Hugging Face directory with "
                     "tokenizer.json instead")
  if pre not in _GPT2_PRE + _DIGITS_PRE:
    raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (known: "
                     f"{', '.join(_GPT2_PRE + _DIGITS_PRE)})")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      {token: i for i, token in enumerate(tokens)}, merges))
  pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  if pre in _DIGITS_PRE:
    pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), pre_tokenizer])
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  kinds = _field(reader, "tokenizer.ggml.token_type", [])
  tokenizer.add_special_tokens([t for t, kind in zip(tokens, kinds)
                                if kind == gguf.TokenType.CONTROL])
  return tokenizer


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order (each head's rotary halves interleaved)."""
  rows, cols = w.shape
  return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_params(path: str, config: LlamaConfig, mesh: Mesh) -> Any:
  """The file's weights, dequantized, as our params (float32) in their shardings on `mesh`."""
  tensors = {t.name: t for t in open_file(path).tensors}
  expected = {gguf_name(n): shape for n, shape in hf.expected_tensors(config).items()}
  found = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
  hf.check_tensors(expected, found, {name: path for name in found}, path)
  heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

  @functools.lru_cache(maxsize=1)  # leaves are placed one after another
  def dequantized(name):
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(found[name])
    kind = name.split(".")[-2]
    return _unpermute(w, heads[kind]) if kind in heads else w

  return hf.place_params(config, mesh, lambda name, index: dequantized(gguf_name(name))[index])
