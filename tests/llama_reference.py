"""An independent float64 numpy forward pass of a LLaMA-family decoder, written from the math.

Weights come as a dict in Hugging Face's layout (`model.layers.0.self_attn.q_proj.weight`, ...,
matrices `(out, in)`, y = x @ W.T) and the architecture as config.json fields.
"""

import numpy as np


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotary(x, theta):
  """Rotate-half rotary positions of x (T, heads, d): pairs (i, i + d/2) turn by
  position * theta^(-2i/d)."""
  t, _, d = x.shape
  angles = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  first, second = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _attention(x, w, cfg):
  """Causal attention of one sequence x (T, E); query head h reads key/value head
  h // (heads / kv_heads)."""
  t = x.shape[0]
  heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d = cfg.get("head_dim") or cfg["hidden_size"] // heads
  q = _rotary((x @ w("self_attn.q_proj").T).reshape(t, heads, d), cfg["rope_theta"])
  k = _rotary((x @ w("self_attn.k_proj").T).reshape(t, kv_heads, d), cfg["rope_theta"])
  v = (x @ w("self_attn.v_proj").T).reshape(t, kv_heads, d)
  k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
  scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  out = np.einsum("hqk,khd->qhd", _softmax(scores), v).reshape(t, heads * d)
  return out @ w("self_attn.o_proj").T


def _swiglu(x, w):
  gate = x @ w("mlp.gate_proj").T
  return (gate / (1 + np.exp(-gate)) * (x @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T


def forward(weights, cfg, tokens) -> np.ndarray:
  """Next-token logits (T, vocab) of one sequence of token ids, in float64."""
  def get(name):
    return np.asarray(weights[name], np.float64)

  eps = cfg["rms_norm_eps"]
  embedding = get("model.embed_tokens.weight")
  x = embedding[np.asarray(tokens)]
  for i in range(cfg["num_hidden_layers"]):
    def w(module, i=i):
      return get(f"model.layers.{i}.{module}.weight")
    x = x + _attention(_rms_norm(x, w("input_layernorm"), eps), w, cfg)
    x = x + _swiglu(_rms_norm(x, w("post_attention_layernorm"), eps), w)
  x = _rms_norm(x, get("model.norm.weight"), eps)
  head = embedding if cfg.get("tie_word_embeddings") else get("lm_head.weight")
  return x @ head.T


def perplexity(logits, tokens) -> float:
  """exp of the mean negative log-likelihood of tokens[1:] under logits[:-1] (float64)."""
  logits = np.asarray(logits, np.float64)[:-1]
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -log_probs[np.arange(len(logits)), np.asarray(tokens)[1:]]
  return float(np.exp(nll.mean()))
