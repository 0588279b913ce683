"""A LLaMA-family decoder in flax, laid out like Hugging Face's `LlamaForCausalLM`.

Parameter names follow the Hugging Face checkpoint (`embed_tokens`, `layers_{i}/self_attn/
{q,k,v,o}_proj`, `layers_{i}/mlp/{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`), with every linear kernel 2-D `(in, out)`: the
sparsity scopes and N:M groups (along the input) apply to them as to any dense layer.
Rotary positions use the rotate-half convention of Hugging Face. Parameters carry logical
axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`) that `safe_dist.sharding` maps onto
the mesh. Blocks are separate modules (`DecoderBlock`) so that layer-wise pruning can run one
block at a time.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02  # Hugging Face's `initializer_range`


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture; the fields of Hugging Face's `LlamaConfig` under their own names."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: Optional[int] = None  # hidden_size // num_attention_heads when None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"llama.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"llama.num_attention_heads ({self.num_attention_heads}) must be a "
                       f"multiple of llama.num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"llama.hidden_size ({self.hidden_size}) must be a multiple of "
                       f"llama.num_attention_heads ({self.num_attention_heads}), or give head_dim")
    if self.dims_per_head % 2:
      raise ValueError(f"rotary positions need an even head dimension, got {self.dims_per_head}")

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def num_parameters(self) -> int:
    e, h, kv, d = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                   self.dims_per_head)
    block = e * d * (2 * h + 2 * kv) + 3 * e * self.intermediate_size + 2 * e
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.vocab_size * e + self.num_hidden_layers * block + e + head


def _linear(features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.normal(INIT_STD), axes))


def _rms_norm(config: LlamaConfig, dtype: Any, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=config.rms_norm_eps, dtype=dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def rotary_angles(positions: jax.Array, head_dim: int, theta: float):
  """(cos, sin) of shape positions.shape + (head_dim,), Hugging Face's layout (halves
  repeated)."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half rotary embedding of x (B, T, heads, head_dim), in float32."""
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with rotary positions."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, _ = x.shape
    d, h, kv = cfg.dims_per_head, cfg.num_attention_heads, cfg.num_key_value_heads
    q = _linear(h * d, ("embed", "heads"), self.dtype, "q_proj")(x).reshape(b, t, h, d)
    k = _linear(kv * d, ("embed", "kv_heads"), self.dtype, "k_proj")(x).reshape(b, t, kv, d)
    v = _linear(kv * d, ("embed", "kv_heads"), self.dtype, "v_proj")(x).reshape(b, t, kv, d)
    cos, sin = rotary_angles(positions, d, cfg.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # One fused op; K/V heads are shared by groups of query heads inside it.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return _linear(cfg.hidden_size, ("heads", "embed"), self.dtype, "o_proj")(
        out.reshape(b, t, h * d))


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = self.config.intermediate_size
    gate = _linear(width, ("embed", "mlp"), self.dtype, "gate_proj")(x)
    up = _linear(width, ("embed", "mlp"), self.dtype, "up_proj")(x)
    return _linear(self.config.hidden_size, ("mlp", "embed"), self.dtype, "down_proj")(
        nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(.)): one transformer block, (B, T, E) -> (B, T, E)."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    normed = _rms_norm(self.config, self.dtype, "input_layernorm")(x)
    x = x + Attention(self.config, self.dtype, name="self_attn")(normed, positions)
    normed = _rms_norm(self.config, self.dtype, "post_attention_layernorm")(x)
    return x + MLP(self.config, self.dtype, name="mlp")(normed)


class Llama(nn.Module):
  """tokens (B, T) int -> next-token logits (B, T, vocab) float32.

  `embed`, `layers` and `head` are exposed for block-wise use
  (`model.apply(variables, tokens, method=Llama.embed)`).
  """
  config: LlamaConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                    ("vocab", "embed")))
    self.layers = [DecoderBlock(cfg, self.dtype) for _ in range(cfg.num_hidden_layers)]
    self.norm = _rms_norm(cfg, self.dtype, "norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg.vocab_size, ("embed", "vocab"), self.dtype, "lm_head")

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens(tokens)

  def head(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics
    x = self.embed(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for block in self.layers:
      x = block(x, positions)
    return self.head(x)
