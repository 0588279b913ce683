"""The export formats: which networks each takes, its writer and its loader.

  masked   network.npz: dense kernels with exact zeros and their boolean masks
  bitmask  network.npz: np.packbits masks and only the kept values, per kernel
  bcoo     network.npz: the data and indices of a `jax.experimental.sparse.BCOO` per kernel
  nm       network.npz: N:M runs only; the N kept values and packed indices per group of M
  hf       a Hugging Face LLaMA directory: language models only

(the per-kernel layouts: `safe_dist.export.codecs`). The array formats also hold
`experiment.json` (the run's experiment, which rebuilds the model); every format holds
`export.json` (format, what was exported, sparsity, N:M, tokenizer, the data's shapes).
`load` reads any of them back into a `Network` equal to the exported one bit for bit.
"""

import dataclasses
import json
import os

from safe_dist import language_models
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist import workdir as workdir_lib
from safe_dist.data import DatasetInfo
from safe_dist.export import archive
from safe_dist.export import codecs
from safe_dist.export import hf_checkpoint
from safe_dist.export.network import Network, Source
from safe_dist.lm import hf

FORMATS = ("masked", "bitmask", "bcoo", "nm", "hf")
EXPORT_FILE = "export.json"


def check_name(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def check(fmt: str, source: Source) -> None:
  """ValueError naming --format and what it allows, when `fmt` cannot export `source`."""
  check_name(fmt)
  if fmt == "nm" and source.n_m is None:
    raise ValueError(f"--format nm needs an N:M run (trained with --nm N:M, or pruned by "
                     f"prune_lm --sparsity_type N:M); the run in --workdir {source.path} has "
                     f"sparsity {source.sparsity}. Use --format bitmask or bcoo for it")
  if fmt == "hf" and not source.is_language_model:
    others = [f for f in FORMATS if f != "hf" and (f != "nm" or source.n_m)]
    raise ValueError(f"--format hf writes language models (a LLaMA run or a prune_lm --out "
                     f"directory); --workdir {source.path} holds a {source.model} run. Use "
                     f"--format {', '.join(others)} for it")


def _record(network: Network, fmt: str) -> dict:
  return {"format": fmt, "description": network.description,
          "weight_sparsity": network.weight_sparsity,
          "n_m": list(network.n_m) if network.n_m else None, "tokenizer": network.tokenizer,
          "info": dataclasses.asdict(network.info)}


def write(network: Network, fmt: str, directory: str) -> None:
  """Writes `network` in format `fmt` into the existing, empty `directory`."""
  if fmt == "hf":
    hf_checkpoint.write(directory, network.experiment.model.llama, network.params,
                        network.tokenizer)
  else:
    archive.save(directory, network.variables(), codecs.get(fmt, network.n_m))
    workdir_lib.write_record(network.experiment, directory)
  workdir_lib.write_json(os.path.join(directory, EXPORT_FILE), _record(network, fmt))


def _info(record: dict) -> DatasetInfo:
  return DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in record["info"].items()})


def _load_hf(directory: str, record: dict) -> Network:
  config, params = hf_checkpoint.read(directory)
  has_tokenizer = os.path.isfile(os.path.join(directory, hf.TOKENIZER_FILE))
  tokenizer = directory if has_tokenizer else record.get("tokenizer")
  exp = language_models.describing_experiment(
      config, tokenizer or "bytes", sharding.MeshConfig(num_devices=1), batch_size=1)
  return Network(params, {}, exp, run_setup.shapes_only_info(exp), tokenizer,
                 tuple(record["n_m"]) if record.get("n_m") else None,
                 record.get("description", directory))


def load(directory: str) -> Network:
  """The network exported into `directory`, in whichever format."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, EXPORT_FILE)) as f:
    record = json.load(f)
  if record["format"] == "hf":
    return _load_hf(directory, record)
  n_m = tuple(record["n_m"]) if record["n_m"] else None
  variables = archive.load(directory, codecs.get(record["format"], n_m))
  return Network(variables["params"], variables.get("batch_stats", {}),
                 workdir_lib.stored_experiment(directory), _info(record), record["tokenizer"],
                 n_m, record["description"])
