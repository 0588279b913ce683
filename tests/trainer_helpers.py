"""Shared helpers of the trainer tests: small experiments and reading event files back."""

import dataclasses
import glob
import os

import fiddle as fdl
import jax
import jax.numpy as jnp

import configs
from safe_dist import sharding
from safe_dist.experiment import Experiment


def debug_experiment(**overrides) -> Experiment:
  """The `debug` config (synthetic data, LeNet, 24 SAFE steps) with `section.field` overrides."""
  cfg = configs.debug()
  for path, value in overrides.items():
    section, field = path.split(".")
    setattr(getattr(cfg, section), field, value)
  return fdl.build(cfg)


def replace(exp: Experiment, section: str, **fields) -> Experiment:
  return dataclasses.replace(exp, **{section: dataclasses.replace(getattr(exp, section), **fields)})


def read_tags(logdir: str) -> dict[str, set[str]]:
  """Tags of every kind (scalars, histograms, tensors (text), ...) under `logdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  out: dict[str, set[str]] = {}
  for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for kind, tags in acc.Tags().items():
      if isinstance(tags, list):
        out.setdefault(kind, set()).update(tags)
  return out


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalar series of the TensorBoard event files under `logdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
      out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
  return out


def abstract_batch(run) -> dict:
  """A train batch of `run` as sharded ShapeDtypeStructs (for tracing or lowering its step)."""
  spec = sharding.batch_sharding(run.mesh)
  b = run.exp.train.batch_size
  if run.task.name == "next_token":
    return {"tokens": jax.ShapeDtypeStruct((b, run.exp.data.seqlen), jnp.int32, sharding=spec)}
  return {"image": jax.ShapeDtypeStruct((b, *run.info.input_shape), jnp.float32, sharding=spec),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=spec)}
