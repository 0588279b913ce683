"""The command-line flags shared by `safe_dist.train` and `safe_dist.eval`.

The reference implementation's flags keep their names and defaults; each maps onto one path
of the fiddle config. Precedence: `--config config:NAME`, then `--config fiddler:/set:`
directives in order, then every reference flag given explicitly, then `--debug`.
"""

import dataclasses
import inspect
import signal
import sys
from typing import Any, Callable, TypeVar

import fiddle as fdl
from absl import app
from absl import flags
from fiddle import absl_flags as fdl_flags

import configs
from safe_dist.experiment import Experiment

DEFAULT_CONFIG = "reference"
FLAGS = flags.FLAGS


def _parse_nm(text: str) -> tuple[int, int]:
  try:
    n, m = (int(x) for x in text.split(":"))
  except ValueError:
    raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {text!r}") from None
  return n, m


def _parse_sparsities(values) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"--eval_sparsities must be numbers in [0, 1), got {values}") from None


# flag name -> (config path, parser of the flag value)
_FLAG_PATHS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "model": ("model.name", str),
    "dataset": ("data.name", str),
    "data_dir": ("data.data_dir", str),
    "label_noise_ratio": ("data.label_noise_ratio", float),
    "validation_examples": ("data.validation_examples", int),
    "num_epochs": ("train.num_epochs", float),
    "batch_size": ("train.batch_size", int),
    "seed": ("train.seed", int),
    "bnt_sample_size": ("train.bnt_sample_size", int),
    "half_precision": ("train.half_precision", bool),
    "checkpoint_every_epoch": ("train.checkpoint_every_epoch", int),
    "checkpoint_every_steps": ("train.checkpoint_every_steps", int),
    "keep_checkpoints": ("train.keep_checkpoints", int),
    "optimizer": ("optimizer.name", str),
    "lr": ("optimizer.lr", float),
    "lr_schedule": ("optimizer.lr_schedule", str),
    "warmup_epochs": ("optimizer.warmup_epochs", float),
    "wd": ("optimizer.weight_decay", float),
    "momentum": ("optimizer.momentum", float),
    "sparsifier": ("sparsifier.name", str),
    "sp": ("sparsifier.sparsity", float),
    "sp_scope": ("sparsifier.scope", str),
    "nm": ("sparsifier.n_m", _parse_nm),
    "lambda": ("sparsifier.lam", float),
    "lambda_schedule": ("sparsifier.lambda_schedule", str),
    "penalty_pull": ("sparsifier.penalty_pull", float),
    "dual_update_interval": ("sparsifier.dual_update_interval", int),
    "sp_schedule": ("sparsifier.sp_schedule", str),
    "rho": ("sparsifier.rho", float),
    "sam_group_size": ("sparsifier.sam_group_size", int),
    "importance": ("sparsifier.importance", str),
    "sharpness_every": ("train.sharpness_every_epochs", float),
    "eval_sparsities": ("eval_sparsities", _parse_sparsities),
}


def define_flags() -> Any:
  """Defines the flags (reference names and defaults); returns the fiddle config flag."""
  config_flag = fdl_flags.DEFINE_fiddle_config(
      "config", default_module=configs,
      help_string="fiddle config: config:NAME (a function of configs/), fiddler:NAME, "
                  f"set:PATH=VALUE; default config:{DEFAULT_CONFIG}")
  flags.DEFINE_string("workdir", "./logdir", "Run directory: checkpoints, TensorBoard, summary.")
  flags.DEFINE_bool("resume_training", False,
                    "Resume from the checkpoint in --workdir (resuming is also automatic when "
                    "--workdir holds a checkpoint of the same experiment).")
  flags.DEFINE_integer("checkpoint_every_epoch", 1, "Epoch interval for checkpointing.")
  flags.DEFINE_integer("checkpoint_every_steps", None, "Step interval for checkpointing "
                       "(overrides --checkpoint_every_epoch; for long epochs).")
  flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")
  flags.DEFINE_bool("half_precision", False, "Compute in bfloat16 (parameters, SAFE's z and u "
                    "and the optimizer state stay float32).")
  flags.DEFINE_bool("debug", False, "One device, a small slice of the data, a few steps, NaN "
                    "checks on, logging every step.")
  flags.DEFINE_string("data_dir", None, "Dataset directory (default: $SAFE_DATA_DIR, then the "
                      "standard install locations).")
  flags.DEFINE_string("model", "ResNet20", "Model (ResNet{20,32,44,56}, ResNet{20,32}x2, "
                      "VGG{11,13,16,19}(-bn), LeNet300-100, LeNet5).")
  flags.DEFINE_string("dataset", "cifar10", "Dataset (mnist, fashion_mnist, cifar10, cifar100, "
                      "synthetic).")
  flags.DEFINE_float("num_epochs", 200, "Number of epochs to train.")
  flags.DEFINE_integer("batch_size", 128, "Global mini-batch size.")
  flags.DEFINE_integer("seed", 1, "Seed for all randomness.")
  flags.DEFINE_string("optimizer", "sgd", "Base optimizer (sgd, adam, adamw).")
  flags.DEFINE_float("lr", 0.1, "Learning rate.")
  flags.DEFINE_string("lr_schedule", "cosine", "Learning rate schedule (constant, linear, cosine).")
  flags.DEFINE_float("warmup_epochs", 5, "Number of warm-up epochs.")
  flags.DEFINE_float("wd", 0.0001, "Weight decay.")
  flags.DEFINE_float("momentum", 0.9, "Momentum.")
  flags.DEFINE_string("sparsifier", "safe", "Sparsifier (safe, safe_plus, admm, gmp, iht, magnitude, none).")
  flags.DEFINE_float("sp", 0.95, "Target sparsity in [0, 1).")
  flags.DEFINE_string("sp_scope", "global", "Sparsity scope (global, layerwise, nm); when not "
                      "given: nm with --nm, else global.")
  flags.DEFINE_string("nm", None, "N:M pattern for --sp_scope nm, e.g. 2:4.")
  flags.DEFINE_integer("bnt_sample_size", 10000, "Samples for BatchNorm re-calibration.")
  flags.DEFINE_float("lambda", 0.0001, "Penalty lambda of SAFE and ADMM.")
  flags.DEFINE_float("penalty_pull", None, "Instead of --lambda: the total pull P = sum_t "
                     "lr(t) lambda(t) / (1 - momentum) the penalty reaches over the run (SGD; "
                     "SAFE, SAFE+, ADMM); lambda is scaled to it. P ~ 10-30 closes the "
                     "constraint gap (BUILD_NOTES.md).")
  flags.DEFINE_string("lambda_schedule", "cosine", "Lambda schedule (constant, linear, cosine); "
                      "when not given: constant for admm, cosine for safe and safe_plus.")
  flags.DEFINE_integer("dual_update_interval", 32, "Steps K between updates of z and u.")
  flags.DEFINE_string("sp_schedule", "cubic", "Gradual sparsity schedule of GMP and IHT "
                      "(constant, linear, cosine, cubic).")
  flags.DEFINE_float("rho", 0.1, "SAM radius rho of SAFE.")
  flags.DEFINE_integer("sam_group_size", 0, "m-sharpness: one SAM perturbation per group of m "
                       "examples of the global batch (0: one for the whole batch). m must "
                       "split the batch into a number of groups divisible by mesh.data, and "
                       "mesh.fsdp must divide m.")
  flags.DEFINE_string("importance", "activation",
                      "SAFE+ importance P: activation (input norms, Wanda-style) or grad_sq.")
  flags.DEFINE_float("sharpness_every", 10.0, "Epochs between Hessian eigenvalue/trace "
                     "estimates on a held-out batch (0: never).")
  flags.DEFINE_float("label_noise_ratio", 0.0, "Fraction of training labels flipped, in [0, 1).")
  flags.DEFINE_integer("validation_examples", 0, "Hold out this many training examples (the "
                       "same for every seed) and evaluate on them instead of the test split "
                       "(0: train on all, evaluate on the test split). The summary's "
                       "eval_split says which; eval's corrupt and adversarial modes always use "
                       "the test split.")
  flags.DEFINE_list("eval_sparsities", [], "Also evaluate the network hard-projected to these "
                    "sparsities.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  return config_flag


def _public_functions(num_params: int) -> tuple[str, ...]:
  """Names of the functions defined in `configs` taking `num_params` arguments."""
  return tuple(name for name, fn in vars(configs).items()
               if inspect.isfunction(fn) and not name.startswith("_")
               and fn.__module__ == configs.__name__
               and len(inspect.signature(fn).parameters) == num_params)


# Base configs take no argument; fiddlers take the config they edit.
CONFIG_NAMES = _public_functions(0)
FIDDLER_NAMES = _public_functions(1)


def _config_values(argv: list[str]) -> list[str]:
  values = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      values.append(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


def checked_config_names(argv: list[str]) -> list[str]:
  """`argv`, after checking its `config:` / `fiddler:` names (fiddle's own message for an
  unknown one is about imports): an unknown one stops here with the allowed names."""
  for value in _config_values(argv):
    kind, _, name = value.partition(":")
    name = name.split("(")[0]
    allowed = {"config": CONFIG_NAMES, "fiddler": FIDDLER_NAMES}.get(kind)
    if allowed is not None and name not in allowed:
      fail(f"--config {kind}:{name}: unknown {kind}; allowed: {', '.join(allowed)}")
  return argv


def with_default_config(argv: list[str]) -> list[str]:
  """`checked_config_names(argv)` with `--config config:reference` prepended unless the
  command line names a base config."""
  checked_config_names(argv)
  if any(v.startswith(("config:", "config_file:", "config_str:"))
         for v in _config_values(argv)):
    return argv
  return argv[:1] + [f"--config=config:{DEFAULT_CONFIG}"] + argv[1:]


def _set_path(cfg: fdl.Config, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  for name in parents:
    cfg = getattr(cfg, name)
  setattr(cfg, leaf, value)


def _replace_path(obj: Any, path: str, value: Any) -> Any:
  """A copy of the frozen dataclass `obj` with the field at `path` (dotted) set to `value`."""
  name, _, rest = path.partition(".")
  inner = _replace_path(getattr(obj, name), rest, value) if rest else value
  return dataclasses.replace(obj, **{name: inner})


def _get_path(obj: Any, path: str) -> Any:
  for name in path.split("."):
    obj = getattr(obj, name)
  return obj


def given_flags(flag_values=FLAGS) -> dict[str, Any]:
  """{flag name: parsed value} of the reference flags given on the command line."""
  return {name: parse(flag_values[name].value) for name, (_, parse) in _FLAG_PATHS.items()
          if flag_values[name].present}


def apply_given_flags(exp: Experiment, overridable, flag_values=FLAGS) -> Experiment:
  """`exp` (a stored run's experiment) with the given reference flags applied.

  Flags named in `overridable` may change the experiment; any other given flag must agree
  with it, else ValueError naming the flag, its value and the run's.
  """
  for name, value in given_flags(flag_values).items():
    path = _FLAG_PATHS[name][0]
    if name in overridable:
      exp = _replace_path(exp, path, value)
    elif _get_path(exp, path) != value:
      raise ValueError(f"--{name} {flag_values[name].value} disagrees with the run in "
                       f"--workdir ({_get_path(exp, path)!r}); leave it out: the run's own "
                       "settings are used")
  return exp


def resolved_config(config_flag, flag_values=flags.FLAGS) -> fdl.Config[Experiment]:
  """The fiddle config with the explicitly given reference flags (and --debug) applied."""
  cfg = config_flag.value
  for name, value in given_flags(flag_values).items():
    _set_path(cfg, _FLAG_PATHS[name][0], value)
  if flag_values.debug:
    cfg = configs.debug_mode(cfg)
  return cfg


def build_experiment(cfg: fdl.Config[Experiment]) -> Experiment:
  """Builds (and so validates) the experiment; a bad value raises ValueError naming its flag."""
  try:
    return fdl.build(cfg)
  except ValueError as e:
    raise ValueError(str(e).split("\n")[0]) from None


class StopOnSignal:
  """Turns SIGTERM/SIGUSR1 into a stop request: call it to know whether one came."""

  def __init__(self):
    self.signal = None
    for sig in (signal.SIGTERM, signal.SIGUSR1):
      signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __call__(self) -> bool:
    return self.signal is not None


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


_Checked = TypeVar("_Checked")


def checked(argv: list[str], check: Callable[[], _Checked]) -> _Checked:
  """`check()` at the start of an absl main: positional arguments are a usage error, and a
  ValueError from `check` (a bad flag value) stops with its message and exit status 2,
  before any work."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    return check()
  except ValueError as e:
    fail(str(e))
