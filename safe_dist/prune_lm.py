"""`python -m safe_dist.prune_lm` (console script `safe-prune-lm`): layer-wise pruning of a
pretrained language model with SAFE, SAFE+, SparseGPT, Wanda or magnitude.

    python -m safe_dist.prune_lm --model smollm2-135m --prune_method safe \\
        --sparsity_ratio 0.5 --sparsity_type unstructured --nsamples 32 --seqlen 256 \\
        --epochs 5 --out pruned/safe50

The flags are the reference language code's (names and defaults). Calibration: `--nsamples`
random windows of `--seqlen` tokens of the train split of `--dataset` (or of
`--calib_text`). Blocks are pruned one at a time (`safe_dist.layerwise.pruner`); each prints
its seconds and reconstruction error. `--out DIR` receives the pruned model (`model.json` and
an orbax checkpoint of the params; `lm_eval --model DIR` and `prune_lm --model DIR` read it)
and `summary.json`: method, sparsity, weight sparsity of the pruned kernels and per kernel,
perplexity of the dense and the pruned model on the held-out split at `--eval_seqlen`,
seconds in all and per block. Every flag is checked before any work; `--out` must be new or
empty (nothing is overwritten).
"""

import dataclasses
import os
import time

import jax
import numpy as np
from absl import app
from absl import flags

from safe_dist import distributed
from safe_dist import language_models
from safe_dist import sharding
from safe_dist import workdir as workdir_lib
from safe_dist.data import text
from safe_dist.flags import checked, fail
from safe_dist.layerwise import pruner as pruner_lib
from safe_dist.layerwise.calibration import calibration_windows
from safe_dist.layerwise.safe_block import SafeBlockConfig
from safe_dist.lm import tokenization

FLAGS = flags.FLAGS
SPARSITY_TYPES = ("unstructured", "2:4", "4:8")
flags.DEFINE_string("model", None, "Named model, HF LLaMA directory, GGUF file, a run's "
                    "workdir or a pruned model.", required=True)
flags.DEFINE_integer("seqlen", 2048, "Tokens per calibration window.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration windows and SAFE's shuffles.")
flags.DEFINE_integer("nsamples", 128, "Number of calibration windows.")
flags.DEFINE_float("sparsity_ratio", 0.5, "Fraction of each kernel's weights pruned.")
flags.DEFINE_string("sparsity_type", "unstructured", f"One of {', '.join(SPARSITY_TYPES)}.")
flags.DEFINE_string("prune_method", "safe", f"One of {', '.join(pruner_lib.METHODS)}.")
flags.DEFINE_bool("activation", False, "SAFE+: --prune_method safe with activation-weighted "
                  "projection (the same as --prune_method safe_plus).")
flags.DEFINE_string("dataset", "shakespeare", f"Calibration and evaluation corpus "
                    f"({', '.join(text.CORPUS_NAMES)}).")
flags.DEFINE_string("calib_text", None, "Calibrate on this UTF-8 text file instead.")
flags.DEFINE_float("lmda", 1e-3, "SAFE: penalty lambda (constant).")
flags.DEFINE_integer("batch_size", 8, "SAFE: calibration windows per step; also per dense pass.")
flags.DEFINE_float("learning_rate", 2e-4, "SAFE: Adam's peak learning rate.")
flags.DEFINE_integer("epochs", 30, "SAFE: epochs over the calibration windows per block.")
flags.DEFINE_integer("interval", 32, "SAFE: steps between dual updates.")
flags.DEFINE_float("warmup_epochs", 2, "SAFE: linear warm-up epochs, then linear decay to 0.")
flags.DEFINE_float("rho", 2e-4, "SAFE: SAM radius.")
flags.DEFINE_float("beta1", 0.9, "SAFE: Adam beta1.")
flags.DEFINE_float("beta2", 0.95, "SAFE: Adam beta2.")
flags.DEFINE_string("out", None, "Directory for the pruned model and summary.json (new or "
                    "empty).", required=True)
flags.DEFINE_integer("eval_seqlen", None, "Perplexity windows (default: --seqlen).")
flags.DEFINE_integer("eval_max_windows", 0, "Evaluate on the first K held-out windows (0: all).")
flags.DEFINE_bool("skip_dense_eval", False, "Do not evaluate the dense model.")
language_models.define_mesh_flags()


def pruning_config() -> pruner_lib.LayerwiseConfig:
  """The flags as a LayerwiseConfig; ValueError naming the flag and its allowed values."""
  if FLAGS.sparsity_type not in SPARSITY_TYPES:
    raise ValueError(f"--sparsity_type must be one of {', '.join(SPARSITY_TYPES)}, got "
                     f"{FLAGS.sparsity_type!r}")
  n_m = None if FLAGS.sparsity_type == "unstructured" else tuple(
      int(v) for v in FLAGS.sparsity_type.split(":"))
  method = FLAGS.prune_method
  if FLAGS.activation:
    if method not in ("safe", "safe_plus"):
      raise ValueError(f"--activation is SAFE+ and goes with --prune_method safe, not {method}")
    method = "safe_plus"
  if n_m is not None and FLAGS.sparsity_ratio != n_m[0] / n_m[1] and FLAGS["sparsity_ratio"].present:
    raise ValueError(f"--sparsity_type {FLAGS.sparsity_type} fixes the ratio at "
                     f"{1 - n_m[0] / n_m[1]:g}; leave --sparsity_ratio out")
  safe = SafeBlockConfig(
      method=method if method in ("safe", "safe_plus") else "safe",
      sparsity=FLAGS.sparsity_ratio, n_m=n_m, lam=FLAGS.lmda, rho=FLAGS.rho,
      interval=FLAGS.interval, learning_rate=FLAGS.learning_rate, epochs=FLAGS.epochs,
      warmup_epochs=FLAGS.warmup_epochs, batch_size=FLAGS.batch_size, beta1=FLAGS.beta1,
      beta2=FLAGS.beta2)
  if method in ("safe", "safe_plus"):
    safe.steps_per_epoch(FLAGS.nsamples)  # --nsamples must be a multiple of --batch_size
  return pruner_lib.LayerwiseConfig(method=method, sparsity=FLAGS.sparsity_ratio, n_m=n_m,
                                    safe=safe, seed=FLAGS.seed, chunk=FLAGS.batch_size)


def check_flags() -> pruner_lib.LayerwiseConfig:
  for name in ("seqlen", "nsamples", "batch_size"):
    if getattr(FLAGS, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
  if FLAGS.calib_text is None:
    text.check_split(FLAGS.dataset, "train")
  elif not os.path.isfile(FLAGS.calib_text):
    raise ValueError(f"--calib_text {FLAGS.calib_text}: no such file")
  if FLAGS.eval_seqlen is not None and FLAGS.eval_seqlen < 2:
    raise ValueError(f"--eval_seqlen must be >= 2, got {FLAGS.eval_seqlen}")
  if os.path.exists(FLAGS.out) and (not os.path.isdir(FLAGS.out) or os.listdir(FLAGS.out)):
    raise ValueError(f"--out {FLAGS.out} exists and is not empty; nothing was changed there. "
                     "Give a new directory.")
  language_models.mesh_config()
  return pruning_config()


def _calibration(tokenizer: str, mesh) -> jax.Array:
  if FLAGS.calib_text is not None:
    with open(FLAGS.calib_text, encoding="utf-8") as f:
      tokens = tokenization.get_tokenizer(tokenizer).encode(f.read())
  else:
    tokens = text.corpus_tokens(FLAGS.dataset, "train", tokenizer)
  windows = calibration_windows(tokens, FLAGS.nsamples, FLAGS.seqlen, FLAGS.seed)
  # Every process holds the same windows; each device takes its rows.
  return jax.make_array_from_callback(windows.shape, sharding.batch_sharding(mesh),
                                      lambda index: windows[index])


def _held_out(model: language_models.LanguageModel) -> np.ndarray:
  tokens = text.corpus_tokens(FLAGS.dataset, "test", model.tokenizer)
  windows = text.windows(tokens, FLAGS.eval_seqlen or FLAGS.seqlen)
  return windows[:FLAGS.eval_max_windows or None]


def main(argv):
  cfg = checked(argv, check_flags)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  start = time.time()
  try:
    model = language_models.load(FLAGS.model, language_models.mesh_config(), FLAGS.batch_size)
    run = model.run
    if FLAGS.nsamples % sharding.data_parallel_size(run.mesh):
      raise ValueError(f"--nsamples {FLAGS.nsamples} must be a multiple of the data-parallel "
                       f"size {sharding.data_parallel_size(run.mesh)}")
    calibration = _calibration(model.tokenizer, run.mesh)
    held_out = _held_out(model)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  dense = None if FLAGS.skip_dense_eval else language_models.perplexity(model, held_out)
  if dense and distributed.is_main_process():
    print(f"dense perplexity {dense['perplexity']:.4f} on {len(held_out)} held-out windows")
  layers = model.run.exp.model.llama.num_hidden_layers
  prune_start = time.time()

  def progress(report: pruner_lib.BlockReport):
    if distributed.is_main_process():
      done = report.index + 1
      bar = "#" * (20 * done // layers)
      print(f"[{bar:<20}] block {done}/{layers}: {report.seconds:.1f} s, reconstruction "
            f"error {report.relative_error:.4g}", flush=True)

  params, reports = pruner_lib.prune_llama(run.model, model.params, calibration, cfg, run.mesh,
                                           run.param_shardings, progress)
  prune_seconds = time.time() - prune_start
  pruned = dataclasses.replace(model, params=params)
  rates = language_models.perplexity(pruned, held_out)
  overall, per_kernel = pruner_lib.kernel_sparsity(params)
  summary = {
      "model": FLAGS.model, "prune_method": cfg.method, "sparsity_ratio": FLAGS.sparsity_ratio,
      "sparsity_type": FLAGS.sparsity_type,
      "weight_sparsity": overall,
      "perplexity": rates["perplexity"],
      "dense_perplexity": dense["perplexity"] if dense else None,
      "eval_seqlen": FLAGS.eval_seqlen or FLAGS.seqlen, "eval_windows": len(held_out),
      "nsamples": FLAGS.nsamples, "seqlen": FLAGS.seqlen, "seconds": time.time() - start,
      "prune_seconds": prune_seconds,
      "seconds_per_block": prune_seconds / max(len(reports), 1),
      "block_seconds": [r.seconds for r in reports],
      "reconstruction_error": [r.relative_error for r in reports],
      "per_layer_sparsity": per_kernel,
      "flags": {name: FLAGS[name].value for name in (
          "lmda", "batch_size", "learning_rate", "epochs", "interval", "warmup_epochs", "rho",
          "beta1", "beta2", "seed", "dataset", "calib_text")},
  }
  os.makedirs(FLAGS.out, exist_ok=True)
  language_models.save_pruned(FLAGS.out, model, params, {
      "description": f"{FLAGS.model} pruned by {cfg.method} to {FLAGS.sparsity_type} "
                     f"{FLAGS.sparsity_ratio:g}", "source": FLAGS.model})
  workdir_lib.write_json(os.path.join(os.path.abspath(FLAGS.out), "summary.json"), summary)
  if distributed.is_main_process():
    print(f"{cfg.method} {FLAGS.sparsity_type} {FLAGS.sparsity_ratio:g}: weight sparsity "
          f"{summary['weight_sparsity']:.2%}, perplexity {rates['perplexity']:.4f}"
          + (f" (dense {dense['perplexity']:.4f})" if dense else "")
          + f", {summary['seconds_per_block']:.1f} s per block; wrote {FLAGS.out}")


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
