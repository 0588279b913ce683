"""Pretrained LLaMA-family models by what `--model` names: a named model, a Hugging Face
checkpoint directory, or a GGUF file (`safe_dist.lm.hf`, `safe_dist.lm.gguf_file`)."""

import dataclasses
import os
from typing import Any, Callable, Optional

import tokenizers
from jax.sharding import Mesh

from safe_dist import assets
from safe_dist.lm import gguf_file
from safe_dist.lm import hf
from safe_dist.models.llama import LlamaConfig

# name -> the path of its files, fetched on first use.
NAMED_MODELS: dict[str, Callable[[], str]] = {"smollm2-135m": assets.smollm2_gguf}


@dataclasses.dataclass(frozen=True)
class Pretrained:
  config: LlamaConfig
  params: Any  # our layout, unboxed, float32, in their shardings
  tokenizer: Optional[tokenizers.Tokenizer]
  source: str  # what was loaded, for logs and run records


def _locate(name_or_path: str):
  """(the module that loads it, its path)."""
  path = NAMED_MODELS[name_or_path]() if name_or_path in NAMED_MODELS else name_or_path
  if os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
    return hf, path
  if os.path.isfile(path) and path.endswith(".gguf"):
    return gguf_file, path
  raise ValueError(f"--model {name_or_path!r} is none of what it accepts: a named model "
                   f"({', '.join(NAMED_MODELS)}), a Hugging Face checkpoint directory (with "
                   f"{hf.CONFIG_FILE} and *.safetensors), or a .gguf file")


def read_config(name_or_path: str) -> LlamaConfig:
  loader, path = _locate(name_or_path)
  return loader.read_config(path)


def load_tokenizer(name_or_path: str) -> Optional[tokenizers.Tokenizer]:
  loader, path = _locate(name_or_path)
  return loader.load_tokenizer(path)


def load_pretrained(name_or_path: str, mesh: Mesh) -> Pretrained:
  """The model's config, its weights placed on `mesh`, and its tokenizer (None if it has
  none)."""
  loader, path = _locate(name_or_path)
  config = loader.read_config(path)
  source = f"{name_or_path} ({path})" if path != name_or_path else path
  return Pretrained(config, loader.load_params(path, config, mesh), loader.load_tokenizer(path),
                    source)
