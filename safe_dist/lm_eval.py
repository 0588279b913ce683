"""`python -m safe_dist.lm_eval` (console script `safe-lm-eval`): perplexity of a language model.

    python -m safe_dist.lm_eval --model smollm2-135m --corpus shakespeare --split test \\
        --seqlen 512 --out ppl.json

Perplexity over the non-overlapping windows of `--seqlen` tokens of the text (remainder
dropped): exp of the token-weighted mean negative log-likelihood of every next token inside
each window. `--model` is a named model (`smollm2-135m`), a Hugging Face LLaMA directory, a
GGUF file, or a run's `--workdir` (its final network: the latest checkpoint hard-projected to
the target sparsity). Windows are split over the data axes of the mesh (`--mesh
DATA,FSDP,TENSOR`), weights over fsdp/tensor. Prints the numbers and writes them as JSON
(`perplexity`, `tokens`, `windows`, `seconds`, ...) to `--out`.
"""

import os
import time

from absl import app
from absl import flags

from safe_dist import distributed
from safe_dist import language_models
from safe_dist import workdir as workdir_lib
from safe_dist.data import text
from safe_dist.flags import checked, fail
from safe_dist.lm import tokenization

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Named model, HF LLaMA directory, GGUF file, or a run's "
                    "workdir.", required=True)
flags.DEFINE_string("corpus", "shakespeare", f"Text corpus ({', '.join(text.CORPUS_NAMES)}).")
flags.DEFINE_string("split", "test", f"Split of --corpus ({', '.join(text.SPLITS)}).")
flags.DEFINE_string("text_file", None, "Evaluate on this UTF-8 text file instead of --corpus.")
flags.DEFINE_integer("seqlen", 2048, "Tokens per window.")
flags.DEFINE_integer("max_windows", 0, "Evaluate the first K windows only (0: all).")
flags.DEFINE_integer("batch_size", 8, "Windows per global batch.")
flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
language_models.define_mesh_flags()


def check_flags() -> None:
  """Raises ValueError naming the flag and its allowed values, before any work."""
  if FLAGS.text_file is None:
    text.check_split(FLAGS.corpus, FLAGS.split)
  elif not os.path.isfile(FLAGS.text_file):
    raise ValueError(f"--text_file {FLAGS.text_file}: no such file")
  if FLAGS.seqlen < 2:
    raise ValueError(f"--seqlen must be >= 2, got {FLAGS.seqlen}")
  if FLAGS.max_windows < 0:
    raise ValueError(f"--max_windows must be >= 0 (0: all), got {FLAGS.max_windows}")
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  if FLAGS.out and os.path.isdir(FLAGS.out):
    raise ValueError(f"--out {FLAGS.out} is a directory; give a file name")
  language_models.mesh_config()


def _windows(tokenizer_name: str):
  if FLAGS.text_file is not None:
    with open(FLAGS.text_file, encoding="utf-8") as f:
      tokens = tokenization.get_tokenizer(tokenizer_name).encode(f.read())
  else:
    tokens = text.corpus_tokens(FLAGS.corpus, FLAGS.split, tokenizer_name)
  return text.windows(tokens, FLAGS.seqlen)[:FLAGS.max_windows or None]


def main(argv):
  checked(argv, check_flags)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  start = time.time()
  try:
    model = language_models.load(FLAGS.model, language_models.mesh_config(), FLAGS.batch_size)
    loaded = time.time()
    windows = _windows(model.tokenizer)
    if not len(windows):
      raise ValueError(f"the text holds fewer than --seqlen {FLAGS.seqlen} tokens")
    rates = language_models.perplexity(model, windows)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  results = {
      "model": FLAGS.model, "network": model.description,
      "text": FLAGS.text_file or f"{FLAGS.corpus}:{FLAGS.split}", "seqlen": FLAGS.seqlen,
      "perplexity": rates["perplexity"], "loss": rates["loss"], "tokens": rates["num_tokens"],
      "windows": len(windows), "seconds": time.time() - loaded,
      "load_seconds": loaded - start}
  if FLAGS.out:
    workdir_lib.write_json(os.path.abspath(FLAGS.out), results)
  if distributed.is_main_process():
    print(f"{FLAGS.model} on {results['text']}: perplexity {results['perplexity']:.4f} over "
          f"{results['tokens']} predicted tokens in {results['windows']} windows of "
          f"{FLAGS.seqlen} ({results['seconds']:.1f} s; loading {results['load_seconds']:.1f} s)")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
