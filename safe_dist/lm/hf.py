"""Hugging Face LLaMA checkpoints: `config.json`, `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`) and `tokenizer.json`.

Our parameter tree differs from the checkpoint only in its names and in linear kernels being
`(in, out)`, the transpose of Hugging Face's `(out, in)` weights. `place_params` creates every
leaf directly in its NamedSharding from a reader of Hugging Face-layout slices, so a host reads
only the parts of each tensor that its devices hold; the GGUF loader uses it too.
"""

import contextlib
import functools
import glob
import json
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from jax.sharding import Mesh
from safetensors import safe_open

from safe_dist import sharding
from safe_dist.models.llama import Llama, LlamaConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_TYPES = ("llama", "mistral")  # the same decoder; mistral may add a sliding window

_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
# Hugging Face's defaults for the fields a config.json may leave out.
_DEFAULTS = {"num_key_value_heads": None, "head_dim": None, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "max_position_embeddings": 2048}
# Tensors that older checkpoints carry and the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Reads the slice `index` (a tuple of slices) of the Hugging Face-layout tensor `name`.
SliceReader = Callable[[str, tuple], np.ndarray]


def config_from_dict(d: Mapping[str, Any], source: str) -> LlamaConfig:
  """The `LlamaConfig` of a config.json's contents; ValueError for what the model can't run."""
  if d.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not supported; "
                     f"accepted: {', '.join(MODEL_TYPES)}")
  missing = [f for f in _REQUIRED_FIELDS if f not in d]
  if missing:
    raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
  scaling = d.get("rope_scaling") or {}
  unsupported = [f"{field}={d.get(field)!r}" for field, bad in (
      ("hidden_act", d.get("hidden_act", "silu") != "silu"),
      ("rope_scaling", scaling.get("rope_type", scaling.get("type", "default")) != "default"),
      ("attention_bias", bool(d.get("attention_bias"))),
      ("mlp_bias", bool(d.get("mlp_bias")))) if bad]
  if unsupported:
    raise ValueError(f"{source}: unsupported {', '.join(unsupported)} (the model has SiLU, "
                     "unscaled rotary positions and no biases)")
  fields = {f: d[f] for f in _REQUIRED_FIELDS}
  fields.update({f: d[f] if d.get(f) is not None else default
                 for f, default in _DEFAULTS.items()})
  fields["num_key_value_heads"] = fields["num_key_value_heads"] or fields["num_attention_heads"]
  if d.get("sliding_window"):
    # Full causal attention equals a sliding window as long as sequences fit in the window.
    fields["max_position_embeddings"] = min(fields["max_position_embeddings"],
                                            d["sliding_window"])
  return LlamaConfig(**fields)


def read_config(directory: str) -> LlamaConfig:
  path = os.path.join(directory, CONFIG_FILE)
  with open(path) as f:
    return config_from_dict(json.load(f), path)


def load_tokenizer(directory: str) -> Optional[tokenizers.Tokenizer]:
  """The checkpoint's `tokenizer.json`, None if it has none."""
  path = os.path.join(directory, TOKENIZER_FILE)
  return tokenizers.Tokenizer.from_file(path) if os.path.isfile(path) else None


def _path_names(path) -> tuple[str, ...]:
  return tuple(k.key for k in path)


def hf_name(names: tuple[str, ...]) -> str:
  """Our parameter path -> the Hugging Face tensor name (our modules bear HF's names)."""
  modules = [n.replace("layers_", "layers.", 1) for n in names[:-1]]
  prefix = "" if modules[0] == "lm_head" else "model."
  return prefix + ".".join(modules) + ".weight"


@functools.lru_cache(maxsize=4)  # tracing a real model's init takes seconds
def _abstract_params(config: LlamaConfig):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0), tokens))["params"]


def _hf_shape(names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape[::-1] if names[-1] == "kernel" else shape


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor name -> its shape `(out, in)`, for every parameter of the model."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(_abstract_params(config)))[0]
  return {hf_name(_path_names(p)): _hf_shape(_path_names(p), x.shape) for p, x in flat}


def check_tensors(expected: Mapping[str, tuple], found: Mapping[str, tuple],
                  file_of: Mapping[str, str], source: str, ignored=()) -> None:
  """ValueError naming the first missing, unexpected or misshapen tensor and its file."""
  missing = [n for n in expected if n not in found]
  if missing:
    raise ValueError(f"{source}: tensor {missing[0]} is missing ({len(missing)} of "
                     f"{len(expected)} expected tensors are)")
  for name, shape in found.items():
    if name not in expected and name not in ignored:
      raise ValueError(f"{file_of[name]}: unexpected tensor {name} (not a parameter of the "
                       f"model that {source}'s config describes)")
    if name in expected and tuple(shape) != tuple(expected[name]):
      raise ValueError(f"{file_of[name]}: tensor {name} has shape {tuple(shape)}, the config "
                       f"needs {tuple(expected[name])}")


def place_params(config: LlamaConfig, mesh: Mesh, read: SliceReader) -> Any:
  """The params (unboxed, float32) in their shardings on `mesh`, each device's shard read
  from a Hugging Face-layout tensor by `read`."""
  abstract = _abstract_params(config)
  shardings = sharding.shardings_for(abstract, mesh)

  def leaf(path, abstract_leaf, leaf_sharding):
    names = _path_names(path)
    name, transposed = hf_name(names), names[-1] == "kernel"
    shards = {}  # devices holding the same slice (replicas) share one host copy

    def shard(index):
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in shards:
        x = read(name, index[::-1] if transposed else index)
        shards[key] = np.ascontiguousarray(x.T if transposed else x, dtype=np.float32)
      return shards[key]

    return jax.make_array_from_callback(abstract_leaf.shape, leaf_sharding, shard)

  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract), shardings)


def _safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, n) for n in names]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise ValueError(f"{index} lists {absent[0]}, which does not exist")
    return files
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise ValueError(f"{directory}: no *.safetensors file")
  return files


def load_params(directory: str, config: LlamaConfig, mesh: Mesh) -> Any:
  """The checkpoint's weights as our params (float32) in their shardings on `mesh`."""
  with contextlib.ExitStack() as stack:
    handles, file_of, shapes = {}, {}, {}
    for path in _safetensors_files(directory):
      handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
      for name in handles[path].keys():
        if name in file_of:
          raise ValueError(f"{path}: tensor {name} is also in {file_of[name]}")
        file_of[name] = path
        shapes[name] = tuple(handles[path].get_slice(name).get_shape())
    ignored = {n for n in shapes if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
      ignored.add("lm_head.weight")  # some tied checkpoints store the copy
    check_tensors(expected_tensors(config), shapes, file_of, directory, ignored)
    return place_params(config, mesh,
                        lambda name, index: handles[file_of[name]].get_slice(name)[index])
