"""`python -m safe_dist.export` (console script `safe-export`): write a run's final network in a
format to deploy.

    python -m safe_dist.export --workdir RUN --format bitmask --out exported/ [--benchmark]

`--workdir` is a training run's workdir (its final network: the latest checkpoint
hard-projected to the target sparsity, BatchNorm re-calibrated) or a `prune_lm --out`
directory. `--format` is one of masked, bitmask, bcoo, nm (N:M runs), hf (language models);
see `safe_dist.export.formats`, whose `load(OUT)` reads any of them back. Prints the size of
every file against the same network stored dense (float32 .npz). `--benchmark` then runs the
exported network with BCOO kernels against dense on the CPU (`safe_dist.export.benchmark`).

Every flag is checked before any work; `--out` must be new or empty. The export is written
beside it and renamed to it when complete: a failed export leaves nothing there.
"""

import os
import shutil

from absl import app
from absl import flags

from safe_dist import language_models
from safe_dist.export import benchmark
from safe_dist.export import formats
from safe_dist.export import network as network_lib
from safe_dist.export import sizes
from safe_dist.flags import checked, fail

FLAGS = flags.FLAGS
DEFAULT_BATCH_SIZES = {"images": [1, 128], "windows": [1, 4]}


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this module defines none:
  other command lines of the package share their names)."""
  flags.DEFINE_string("workdir", None,
                      "A training run's workdir, or a prune_lm --out directory.")
  flags.DEFINE_string("format", None, f"Export format ({', '.join(formats.FORMATS)}).")
  flags.DEFINE_string("out", None, "Directory to write (new or empty).")
  flags.DEFINE_string("mesh", "-1,1,1", "Mesh DATA,FSDP,TENSOR that restores the run's "
                      "checkpoint (any mesh restores any checkpoint; -1: the other devices).")
  flags.DEFINE_string("data_dir", None, "Where a vision run's dataset is, if not where the run "
                      "read it (BatchNorm re-calibration reads training images).")
  flags.DEFINE_bool("benchmark", False, "Then time inference with BCOO kernels against dense "
                    "on the CPU (LeNet300-100 and LLaMA models).")
  flags.DEFINE_list("benchmark_batch_sizes", None, "--benchmark: batch sizes (default "
                    f"{','.join(map(str, DEFAULT_BATCH_SIZES['images']))} for images, "
                    f"{','.join(map(str, DEFAULT_BATCH_SIZES['windows']))} for language "
                    "models' windows: a sparse matmul's scratch grows with tokens x nonzeros).")
  flags.DEFINE_integer("benchmark_repeats", 20, "--benchmark: timed forwards per batch size.")


def batch_sizes(source: network_lib.Source, flag_values=FLAGS) -> list[int]:
  """--benchmark_batch_sizes, or the defaults for what `source` holds."""
  given = flag_values.benchmark_batch_sizes
  if given is None:
    return DEFAULT_BATCH_SIZES["windows" if source.is_language_model else "images"]
  try:
    values = [int(v) for v in given]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ValueError("--benchmark_batch_sizes must be positive integers, e.g. 1,128; got "
                     f"{','.join(given)!r}")
  return values


def check_flags(flag_values=FLAGS) -> network_lib.Source:
  """What --workdir holds; ValueError naming the flag and its allowed values."""
  formats.check_name(flag_values.format)
  out = flag_values.out
  if not out:
    raise ValueError("--out is required: a new or empty directory")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out {out} exists and is not empty; nothing was changed there. Give "
                     "a new or empty directory")
  if not flag_values.workdir:
    raise ValueError("--workdir is required: a training run's workdir or a prune_lm --out "
                     "directory")
  source = network_lib.inspect(flag_values.workdir)
  formats.check(flag_values.format, source)
  language_models.mesh_config(flag_values.mesh)
  if flag_values.benchmark:
    benchmark.check(source.model)
    batch_sizes(source, flag_values)
    if flag_values.benchmark_repeats < 1:
      raise ValueError(f"--benchmark_repeats must be >= 1, got {flag_values.benchmark_repeats}")
  return source


def write_new(network: network_lib.Network, fmt: str, out: str) -> None:
  """Writes the export beside `out` and renames it to `out` (absent or empty) when complete."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = f"{out}.tmp-{os.getpid()}"
  os.makedirs(staging)
  try:
    formats.write(network, fmt, staging)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _how_to_load(fmt: str, out: str) -> str:
  if fmt == "hf":
    return (f"load it with any Hugging Face LLaMA reader, or `python -m safe_dist.lm_eval "
            f"--model {out}`")
  return f"load it with `safe_dist.export.formats.load({out!r})`"


def main(argv):
  source = checked(argv, check_flags)
  out = os.path.abspath(FLAGS.out)
  try:
    network = network_lib.final_network(source, language_models.mesh_config(FLAGS.mesh),
                                        FLAGS.data_dir)
    write_new(network, FLAGS.format, out)
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  print(f"{network.description}: weight sparsity {network.weight_sparsity:.2%}")
  print(f"wrote --format {FLAGS.format} to {out}; {_how_to_load(FLAGS.format, out)}")
  print(sizes.table(out, network))
  if FLAGS.benchmark:
    measurements = benchmark.run(formats.load(out), batch_sizes(source),
                                 FLAGS.benchmark_repeats)
    print(f"\ninference on the CPU, BCOO kernels against dense (median of "
          f"{FLAGS.benchmark_repeats} forwards):")
    print(benchmark.table(measurements))
    print(f"process peak RSS {benchmark.peak_rss_bytes() / 2**20:.0f} MiB (the whole command: "
          "restore, export, both forwards)")


def run():
  """Console-script entry point."""
  define_flags()
  app.run(main)
