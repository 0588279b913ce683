"""Tiny Hugging Face LLaMA checkpoints written from random weights (shared by the LM tests)."""

import json
import os

import numpy as np

from safe_dist.export.hf_checkpoint import save_tensors


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Hugging Face's tensor names and `(out, in)` shapes for a config.json."""
  e, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d = cfg.get("head_dim") or e // h
  shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
  for i in range(cfg["num_hidden_layers"]):
    block = {"self_attn.q_proj": (h * d, e), "self_attn.k_proj": (kv * d, e),
             "self_attn.v_proj": (kv * d, e), "self_attn.o_proj": (e, h * d),
             "mlp.gate_proj": (f, e), "mlp.up_proj": (f, e), "mlp.down_proj": (e, f),
             "input_layernorm": (e,), "post_attention_layernorm": (e,)}
    shapes.update({f"model.layers.{i}.{m}.weight": s for m, s in block.items()})
  if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, e)
  return shapes


def random_weights(cfg, seed=0) -> dict[str, np.ndarray]:
  """float32 weights large enough that attention and the norms' scales matter."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in hf_shapes(cfg).items():
    if len(shape) == 1:
      weights[name] = 1 + 0.2 * rng.standard_normal(shape)
    else:
      scale = 1.0 if "embed_tokens" in name else shape[1] ** -0.5
      weights[name] = scale * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in weights.items()}


def write_hf(directory, cfg, weights, num_files=1) -> str:
  """A Hugging Face checkpoint: config.json, and the weights in one safetensors file or
  `num_files` shards with an index (the exporter's writer, `hf_checkpoint.save_tensors`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_tensors(str(directory), weights, num_files)
  return str(directory)
