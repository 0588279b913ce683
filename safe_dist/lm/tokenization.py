"""Tokenizers by name: raw UTF-8 bytes, or the tokenizer of a pretrained model.

`get_tokenizer("bytes")` needs nothing; any other name is what `--model` accepts (a named
model, an HF directory, a GGUF file) or a `tokenizer.json`.
"""

import functools
import os

import numpy as np
import tokenizers

from safe_dist.lm import pretrained

BYTES = "bytes"


class ByteTokenizer:
  """Text <-> its UTF-8 bytes (vocabulary 256): tiny models need no fetched tokenizer."""
  name = BYTES
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers.Tokenizer` (no special tokens added: windows are plain text)."""

  def __init__(self, tokenizer, name: str):
    self.tokenizer, self.name = tokenizer, name
    self.vocab_size = tokenizer.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


@functools.lru_cache(maxsize=4)
def get_tokenizer(name: str):
  """The tokenizer called `name` (see the module docstring); ValueError if it has none."""
  if name == BYTES:
    return ByteTokenizer()
  if os.path.isfile(name) and name.endswith(".json"):
    return HFTokenizer(tokenizers.Tokenizer.from_file(name), name)
  tokenizer = pretrained.load_tokenizer(name)
  if tokenizer is None:
    raise ValueError(f"--tokenizer {name!r}: that model has no tokenizer; use 'bytes', a named "
                     "model, an HF directory with tokenizer.json, or a GGUF file")
  return HFTokenizer(tokenizer, name)
