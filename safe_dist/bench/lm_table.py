"""The layer-wise pruning table: `prune_lm` once per (method, sparsity type), then one table.

  python -m safe_dist.bench.lm_table --out runs/smollm2_table -- \\
      --model smollm2-135m --nsamples 16 --seqlen 256 --eval_seqlen 512 --eval_max_windows 64

Everything after `--` goes to every `prune_lm` run unchanged. Each cell writes
`OUT/<method>_<type>/` (type `2:4` as `2-4`); a cell whose `summary.json` exists is skipped,
an interrupted one (a directory without it) is moved aside to `<cell>.interrupted-N` and run
again, so nothing on disk is lost. The first cell also measures the dense perplexity; the
rest pass `--skip_dense_eval`. `--report_only` prints the table of what is there.
"""

import argparse
import json
import os
import subprocess
import sys

from safe_dist.layerwise import pruner

SPARSITY_TYPES = ("unstructured", "2:4", "4:8")


def cell_dir(out: str, method: str, sparsity_type: str) -> str:
  return os.path.join(out, f"{method}_{sparsity_type.replace(':', '-')}")


def read_summary(directory: str):
  path = os.path.join(directory, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def move_aside(directory: str) -> str:
  """Renames an interrupted cell to the first free `<dir>.interrupted-N`."""
  n = 1
  while os.path.exists(f"{directory}.interrupted-{n}"):
    n += 1
  target = f"{directory}.interrupted-{n}"
  os.rename(directory, target)
  return target


def run_cell(out: str, method: str, sparsity_type: str, prune_args: list[str],
             measure_dense: bool) -> dict:
  directory = cell_dir(out, method, sparsity_type)
  summary = read_summary(directory)
  if summary is not None:
    print(f"{method} {sparsity_type}: done before, skipped", flush=True)
    return summary
  if os.path.exists(directory):
    print(f"{method} {sparsity_type}: interrupted run moved to {move_aside(directory)}")
  command = [sys.executable, "-m", "safe_dist.prune_lm", *prune_args,
             "--prune_method", method, "--sparsity_type", sparsity_type, "--out", directory]
  if not measure_dense:
    command.append("--skip_dense_eval")
  print(" ".join(command), flush=True)
  subprocess.run(command, check=True)
  return read_summary(directory)


def table(summaries: dict, methods, sparsity_types) -> str:
  """Markdown: one row per method, perplexity and seconds per block per sparsity type."""
  dense = next((s["dense_perplexity"] for s in summaries.values()
                if s and s.get("dense_perplexity")), None)
  header = ["method"] + [f"{t} perplexity" for t in sparsity_types] + [
      f"{t} s/block" for t in sparsity_types]
  lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
  if dense is not None:
    lines.append("| dense | " + " | ".join([f"{dense:.2f}"] * len(sparsity_types)
                                            + ["-"] * len(sparsity_types)) + " |")
  for method in methods:
    cells = [summaries.get((method, t)) for t in sparsity_types]
    lines.append("| " + " | ".join(
        [method] + [f"{c['perplexity']:.2f}" if c else "-" for c in cells]
        + [f"{c['seconds_per_block']:.1f}" if c else "-" for c in cells]) + " |")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="Directory of the cells.")
  parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,safe,safe_plus")
  parser.add_argument("--sparsity_types", default="unstructured,2:4")
  parser.add_argument("--report_only", action="store_true")
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.prune_args = argv[split + 1:]
  args.methods = args.methods.split(",")
  args.sparsity_types = args.sparsity_types.split(",")
  for flag, values, allowed in (("--methods", args.methods, pruner.METHODS),
                                ("--sparsity_types", args.sparsity_types, SPARSITY_TYPES)):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f"{flag}: {', '.join(bad)} not in {', '.join(allowed)}")
  for owned in ("--prune_method", "--sparsity_type", "--out", "--skip_dense_eval"):
    if any(a == owned or a.startswith(owned + "=") for a in args.prune_args):
      parser.error(f"{owned} is set per cell by lm_table; leave it out of the prune_lm flags")
  return args


def main(argv=None):
  args = parse_args(argv)
  summaries = {}
  for t in args.sparsity_types:
    for m in args.methods:
      if args.report_only:
        summaries[m, t] = read_summary(cell_dir(args.out, m, t))
      else:
        os.makedirs(args.out, exist_ok=True)
        summaries[m, t] = run_cell(args.out, m, t, args.prune_args, measure_dense=not summaries)
  print(table(summaries, args.methods, args.sparsity_types))


if __name__ == "__main__":
  main()
