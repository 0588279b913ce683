"""A language model as a Hugging Face LLaMA directory, which `safe_dist.lm.hf` (and any tool
that reads HF LLaMA checkpoints) loads back bit for bit.

`config.json` holds the LlamaConfig fields; `model.safetensors` the float32 weights under
Hugging Face's names, linear weights `(out, in)` (ours are `(in, out)`), pruned weights kept
as zeros; `tokenizer.json` the model's tokenizer: its Hugging Face tokenizer, or for the
byte-level models trained here an equivalent byte-level one (ids = UTF-8 bytes).
"""

import json
import os
from typing import Optional

import jax
import numpy as np
import tokenizers
from absl import logging
from safetensors.numpy import save_file

from safe_dist import sharding
from safe_dist.lm import hf
from safe_dist.lm import tokenization
from safe_dist.models.llama import LlamaConfig

SAFETENSORS_FILE = "model.safetensors"


def hf_config(config: LlamaConfig) -> dict:
  """config.json's contents: the LlamaConfig fields and what Hugging Face needs besides."""
  fields = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads, "rope_theta": config.rope_theta,
      "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
      "max_position_embeddings": config.max_position_embeddings}
  if config.head_dim is not None:  # else Hugging Face's default, hidden_size / heads
    fields["head_dim"] = config.head_dim
  return fields


def hf_tensors(params) -> dict[str, np.ndarray]:
  """Our params as Hugging Face's tensors: names, and linear weights transposed to (out, in)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, x in flat:
    names = tuple(k.key for k in path)
    x = np.asarray(x, np.float32)
    out[hf.hf_name(names)] = np.ascontiguousarray(x.T if names[-1] == "kernel" else x)
  return out


def save_tensors(directory: str, tensors: dict[str, np.ndarray], num_files: int = 1) -> None:
  """`model.safetensors`, or `num_files` shards listed by `model.safetensors.index.json`."""
  if num_files == 1:
    save_file(tensors, os.path.join(directory, SAFETENSORS_FILE))
    return
  names = sorted(tensors)
  weight_map = {}
  for i in range(num_files):
    file = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
    part = {n: tensors[n] for n in names[i::num_files]}
    save_file(part, os.path.join(directory, file))
    weight_map.update({n: file for n in part})
  total = sum(x.nbytes for x in tensors.values())
  with open(os.path.join(directory, hf.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable character for each byte, the alphabet of byte-level tokenizers."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def byte_tokenizer() -> tokenizers.Tokenizer:
  """A Hugging Face tokenizer whose ids are the UTF-8 bytes of the text, as `ByteTokenizer`'s."""
  vocab = {c: b for b, c in _bytes_to_unicode().items()}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  return tokenizer


def model_tokenizer(name: Optional[str]) -> Optional[tokenizers.Tokenizer]:
  """The Hugging Face tokenizer of the tokenizer called `name`; None if there is none."""
  if name is None:
    return None
  if name == tokenization.BYTES:
    return byte_tokenizer()
  try:
    return tokenization.get_tokenizer(name).tokenizer
  except (ValueError, FileNotFoundError) as e:
    logging.warning("no tokenizer.json written: tokenizer %r cannot be loaded (%s)", name, e)
    return None


def write(directory: str, config: LlamaConfig, params, tokenizer: Optional[str]) -> None:
  """config.json, model.safetensors and (when the model has one) tokenizer.json."""
  with open(os.path.join(directory, hf.CONFIG_FILE), "w") as f:
    json.dump(hf_config(config), f, indent=2)
  save_tensors(directory, hf_tensors(params))
  hf_tokenizer = model_tokenizer(tokenizer)
  if hf_tokenizer is not None:
    hf_tokenizer.save(os.path.join(directory, hf.TOKENIZER_FILE))


def read(directory: str) -> tuple[LlamaConfig, dict]:
  """The config and the params (numpy) of a Hugging Face directory, read by the project's
  importer (`safe_dist.lm.hf`) onto one device."""
  config = hf.read_config(directory)
  mesh = sharding.make_mesh(sharding.MeshConfig(num_devices=1))
  return config, jax.device_get(hf.load_params(directory, config, mesh))
