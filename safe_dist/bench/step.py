"""Cost of SAFE: time per train step of each method, and the train state's bytes per device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m safe_dist.bench.step \\
        [--model ResNet20 --batch_size 128 --dual_update_interval 32 --windows 3] \\
        [--half_precision] [--memory_config lm_1b --memory_devices 1,2,4,8]

Time: the trainer's jitted, sharded train step (`run_setup.setup`) of each method on the
same model, batch (random CIFAR-shaped images) and devices (batch over all of them): dense
(the reference config's base optimizer, SGD with momentum), SAM (dense, `--rho`), ADMM,
SAFE, SAFE+, GMP, IHT. After `--warmup` steps, `--windows` windows of K =
`--dual_update_interval` consecutive steps are timed per method, the methods taking turns
window by window so that a shared machine's load falls on all alike; each step is waited for.
Per method: the median step (the plain step: SAFE's and ADMM's dual update and GMP's mask
update, once per window, fall outside it) and the mean step of a window (median over
windows): the dual update amortised over its interval. Both as ratios to dense. GMP prunes
every K steps here (its default interval is 100 steps).

Memory: bytes per device of the full train state (parameters, optimizer and sparsifier state)
of `--memory_config` (default lm_1b: 1.1B parameters, AdamW) for each method under FSDP over
1, 2, 4, 8 devices, evaluated abstractly (`memory.state_bytes`; nothing is allocated).
"""

import argparse
import dataclasses
import statistics
import time
from unittest import mock

import fiddle as fdl
import jax
import numpy as np
import optax

import configs
from safe_dist import data as data_lib
from safe_dist import flags as run_flags
from safe_dist import memory
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist.bench import peak_memory_line
from safe_dist.experiment import Experiment
from safe_dist.sparsity import sam_gradient

DENSE, SAM, SAFE = "dense", "SAM", "SAFE"
# method -> the sparsifier fields it sets on the config's; SAM is dense with the SAM gradient.
METHODS = {
    DENSE: {"name": "none"},
    SAM: {"name": "none"},
    "ADMM": {"name": "admm", "rho": 0.0},
    SAFE: {"name": "safe"},
    "SAFE+": {"name": "safe_plus"},
    "GMP": {"name": "gmp"},
    "IHT": {"name": "iht"},
}
# What setup() needs of CIFAR-10 (no data is read: the batch is random).
CIFAR_SHAPED = data_lib.DatasetInfo(50000, 10000, 10, (32, 32, 3), (0.49, 0.48, 0.45),
                                    (0.25, 0.24, 0.26))


def _dense_sam(cfg, base, total_steps, projection=None):
  del total_steps, projection
  return optax.chain(sam_gradient(cfg.rho), base)


def setup_method(exp: Experiment, method: str, info, devices=None) -> run_setup.Run:
  """The run the trainer would set up for `exp` with `method`'s sparsifier."""
  exp = dataclasses.replace(exp, sparsifier=dataclasses.replace(exp.sparsifier,
                                                                **METHODS[method]))
  if method != SAM:
    return run_setup.setup(exp, devices, info)
  # setup() builds the optimizer from the sparsifier, and dense SAM is no sparsifier: its
  # optimizer takes the factory's place while the run is set up, so that the model,
  # shardings and jitted step are the trainer's.
  with mock.patch.object(run_setup, "make_optimizer", _dense_sam):
    return run_setup.setup(exp, devices, info)


def timing_experiment(model: str, batch_size: int, interval: int, rho: float,
                      half_precision: bool = False) -> Experiment:
  """The reference config (SGD with momentum, SAFE's defaults) on `model`; the schedules are
  set 100 windows long, so that the timed steps fall early in them (GMP and IHT prune)."""
  cfg = configs.reference()
  cfg.train.half_precision = half_precision
  cfg.model.name = model
  cfg.train.batch_size = batch_size
  cfg.train.max_steps = 100 * interval
  cfg.sparsifier.dual_update_interval = interval
  cfg.sparsifier.prune_interval = interval
  cfg.sparsifier.rho = rho
  return fdl.build(cfg)


def random_batch(run: run_setup.Run, batch_size: int) -> dict:
  rng = np.random.default_rng(0)
  local = {"image": rng.random((batch_size, *run.info.input_shape), np.float32),
           "label": rng.integers(0, run.info.num_classes, batch_size).astype(np.int32)}
  return sharding.global_batch(run.mesh, local)


class StepTimer:
  """One method's run, state and batch; times its steps, waiting for each."""

  def __init__(self, run: run_setup.Run, batch: dict):
    self.run, self.batch = run, batch
    self.state = run.init(0)
    self.step_seconds: list[float] = []
    self.window_means: list[float] = []

  def steps(self, n: int) -> list[float]:
    seconds = []
    for _ in range(n):
      start = time.perf_counter()
      self.state, _ = self.run.train_step(self.state, self.batch)
      jax.block_until_ready(self.state)
      seconds.append(time.perf_counter() - start)
    return seconds

  def window(self, n: int) -> None:
    seconds = self.steps(n)
    self.step_seconds += seconds
    self.window_means.append(sum(seconds) / n)

  @property
  def median_step(self) -> float:
    return statistics.median(self.step_seconds)

  @property
  def amortised_step(self) -> float:
    return statistics.median(self.window_means)


def time_methods(exp: Experiment, methods: list[str], warmup: int, windows: int,
                 devices) -> dict[str, StepTimer]:
  """Every method compiled and warmed up first, then `windows` rounds of one window each."""
  timers = {}
  for method in methods:
    start = time.perf_counter()
    run = setup_method(exp, method, CIFAR_SHAPED, devices)
    timers[method] = StepTimer(run, random_batch(run, exp.train.batch_size))
    timers[method].steps(warmup)
    print(f"  {method}: compiled, {warmup} warm-up steps, {time.perf_counter() - start:.0f} s",
          flush=True)
  for _ in range(windows):
    for timer in timers.values():
      timer.window(exp.sparsifier.dual_update_interval)
  return timers


def timing_table(timers: dict[str, StepTimer]) -> str:
  base = timers[DENSE]
  lines = ["| method | step ms (median) | x dense | amortised ms (window mean) | x dense |",
           "|---|---:|---:|---:|---:|"]
  for method, t in timers.items():
    lines.append(f"| {method} | {1e3 * t.median_step:.1f} | "
                 f"{t.median_step / base.median_step:.2f} | {1e3 * t.amortised_step:.1f} | "
                 f"{t.amortised_step / base.amortised_step:.2f} |")
  if SAM in timers and SAFE in timers:
    sam, safe = timers[SAM], timers[SAFE]
    lines.append(f"\nSAFE / SAM: {safe.median_step / sam.median_step:.3f}x per step, "
                 f"{safe.amortised_step / sam.amortised_step:.3f}x amortised (goal: <= 1.05x)")
  return "\n".join(lines)


def state_bytes_by_devices(exp: Experiment, methods: list[str], counts: list[int]
                           ) -> tuple[dict[tuple[str, int], dict], int]:
  """({(method, n): memory.state_bytes per device} of `exp` under FSDP over n devices,
  the number of parameters)."""
  info = run_setup.shapes_only_info(exp)
  out, num_params = {}, 0
  for n in counts:
    fsdp = dataclasses.replace(exp, mesh=sharding.MeshConfig(data=1, fsdp=-1, tensor=1,
                                                             num_devices=n))
    for method in methods:
      state = setup_method(fsdp, method, info).abstract_state
      out[method, n] = memory.state_bytes(state)
      num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return out, num_params


def memory_tables(rows: dict[tuple[str, int], dict], methods: list[str],
                  counts: list[int]) -> str:
  """Per method, the state's bytes per device at each device count; SAFE's by part."""
  unit, size = ("GiB", 2**30) if max(r["total"] for r in rows.values()) >= 2**30 else (
      "MiB", 2**20)
  head = "| " + " | ".join(f"{n} device{'s' * (n > 1)}" for n in counts) + " |"
  rule = "|---|" + "---:|" * len(counts)
  row = lambda name, values: f"| {name} | " + " | ".join(f"{v / size:.3f}" for v in values) + " |"
  lines = [f"{unit} per device:", "", "| method " + head, rule]
  lines += [row(m, [rows[m, n]["total"] for n in counts]) for m in methods]
  if SAFE in methods:
    lines += ["", f"{SAFE} by part ({unit} per device):", "", "| part " + head, rule]
    lines += [row(part, [rows[SAFE, n][part] for n in counts]) for part in rows[SAFE, counts[0]]]
  return "\n".join(lines)


def parse_names(text: str, allowed, what: str) -> list[str]:
  """The comma-separated names of `text`; the first not in `allowed` ends the run, naming them."""
  names = [n for n in text.split(",") if n]
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise SystemExit(f"error: unknown {what} {unknown[0]!r}; allowed: {', '.join(allowed)}")
  return names


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="ResNet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--dual_update_interval", type=int, default=32,
                      help="K: steps per timed window (the reference config's interval)")
  parser.add_argument("--rho", type=float, default=0.1, help="SAM radius of SAM and SAFE(+)")
  parser.add_argument("--devices", type=int, default=None,
                      help="time on the first N devices (default: all)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
  parser.add_argument("--windows", type=int, default=3, help="timed windows per method")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--half_precision", action="store_true",
                      help="bfloat16 compute over float32 state, as the trainer's flag")
  parser.add_argument("--memory_config", default="lm_1b",
                      help="a config of configs/ for the memory table ('' skips it)")
  parser.add_argument("--memory_devices", default="1,2,4,8")
  args = parser.parse_args(argv)
  methods = parse_names(args.methods, METHODS, "method")
  if DENSE not in methods:
    methods.insert(0, DENSE)  # the ratios' base
  devices = jax.devices()[:args.devices]
  exp = timing_experiment(args.model, args.batch_size, args.dual_update_interval, args.rho,
                          args.half_precision)
  precision = "bfloat16 compute" if args.half_precision else "float32"
  print(f"train step of {args.model} ({precision}), batch {args.batch_size} (32x32x3 random "
        f"images) over "
        f"{len(devices)} {devices[0].platform} device(s); dense = {exp.optimizer.name} "
        f"(momentum {exp.optimizer.momentum}); K = {args.dual_update_interval}: "
        f"{args.windows} windows of {args.dual_update_interval} steps per method after "
        f"{args.warmup} warm-up steps", flush=True)
  timers = time_methods(exp, methods, args.warmup, args.windows, devices)
  print(timing_table(timers), flush=True)
  print(peak_memory_line() + " (all the methods above, one process)", flush=True)
  if not args.memory_config:
    return
  config = parse_names(args.memory_config, run_flags.CONFIG_NAMES, "config")[0]
  counts = [int(n) for n in args.memory_devices.split(",")]
  missing = [n for n in counts if n > jax.device_count()]
  counts = [n for n in counts if n <= jax.device_count()]
  mem_exp = fdl.build(getattr(configs, config)())
  rows, num_params = state_bytes_by_devices(mem_exp, methods, counts)
  print(f"\ntrain state of config:{config} ({num_params / 1e6:.1f}M parameters, "
        f"{mem_exp.optimizer.name}) under FSDP, abstract evaluation"
        + (f"; not shown: {missing} devices (only {jax.device_count()} present)" if missing
           else ""))
  print(memory_tables(rows, methods, counts))


if __name__ == "__main__":
  main()
