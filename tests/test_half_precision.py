"""--half_precision: bfloat16 compute over float32 master weights, z, u and optimizer state;
SAM's norm in float32; the bf16 quickstart within a point of float32; a non-finite step stops
the run, keeping the last finite checkpoint."""

import os
import re
import subprocess
import sys

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from helpers import REPO
from safe_dist import data as data_lib
from safe_dist import run_setup, trainer
from safe_dist import workdir as workdir_lib
from safe_dist.checkpointing import Checkpointer
from safe_dist.sharding import MeshConfig
from safe_dist.sparsity.sam import sam_gradient
from trainer_helpers import abstract_batch

def _float_dtypes(tree) -> set:
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_vision_state_stays_float32():
  """SAFE+ (grad_sq importance) on LeNet in bf16: every float of the train state (params,
  SAFE's a = x + u, the importance sums, momentum, SAM's loss, lambda, ...) is float32.
  (BatchNorm statistics: test_models.py.)"""
  cfg = configs.debug()
  cfg.train.half_precision = True
  cfg.sparsifier.name, cfg.sparsifier.importance = "safe_plus", "grad_sq"
  run = run_setup.setup(fdl.build(cfg))
  assert _float_dtypes(run.abstract_state) == {jnp.dtype(jnp.float32)}


def test_llama_computes_in_bfloat16_over_float32_state():
  """SAFE/AdamW on the LLaMA decoder in bf16, with m-sharpness (8 groups of 2: the vmapped
  passes): every float of the state is float32, the step maps the state to its own shapes and
  dtypes, and every matrix product of the model (both SAM passes) is computed in bfloat16."""
  cfg = configs.lm_shakespeare_tiny()
  cfg.train.half_precision, cfg.sparsifier.sam_group_size = True, 2
  cfg.model.llama.num_hidden_layers = 1
  exp = fdl.build(cfg)
  run = run_setup.setup(exp, info=run_setup.shapes_only_info(exp))
  assert _float_dtypes(run.abstract_state) == {jnp.dtype(jnp.float32)}
  lowered = run.train_step.lower(run.abstract_state, abstract_batch(run))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(lowered.out_info[0]) == shapes(run.abstract_state)
  dots = [line for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
  # The means over groups (`group_mean`) are float32 products at HIGHEST precision by design.
  dots = [line for line in dots if "precision = [HIGHEST, HIGHEST]" not in line]
  assert len(dots) >= 6  # forward and backward of each pass
  # Operands in bfloat16, or (the attention's backward through its float32 softmax) a
  # product computed at bfloat16 precision.
  bf16 = lambda line: (re.search(r": \(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\)", line) or
                       "lhs_precision_type = bf16, rhs_precision_type = bf16" in line)
  assert all(bf16(line) for line in dots), [line for line in dots if not bf16(line)]


# The quickstart (config:fashion_mnist_lenet: SAFE, LeNet-300-100, Fashion-MNIST, 95%) is 2808
# steps; here it runs SCALE times shorter with its per-step schedules compressed alike (warm-up,
# lambda x SCALE, dual update interval K / SCALE), so that the ADMM run ends as settled as the
# full one (as many dual updates, the same total proximal pull lr * lambda * T): its projected
# accuracy then varies by ~0.3 points with the seed or the precision, where cutting the steps
# alone left the constraint gap open and the projected accuracy swinging by 2 points.
QUICKSTART_STEPS, STEPS = 2808, 600
SCALE = QUICKSTART_STEPS / STEPS


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory):
  """{half_precision: summary} of the compressed quickstart, on one device."""
  summaries = {}
  for half in (False, True):
    cfg = configs.fashion_mnist_lenet()
    try:
      data_lib.info(fdl.build(cfg.data))
    except data_lib.DatasetNotFoundError:
      pytest.skip("Fashion-MNIST not installed")
    cfg.train.max_steps = STEPS
    cfg.optimizer.warmup_epochs /= SCALE
    cfg.sparsifier.lam *= SCALE
    cfg.sparsifier.dual_update_interval = round(cfg.sparsifier.dual_update_interval / SCALE)
    cfg.train.sharpness_every_epochs = 0
    cfg.mesh = fdl.Config(MeshConfig, data=1, num_devices=1)
    cfg.train.half_precision = half
    summaries[half] = trainer.train_and_evaluate(
        fdl.build(cfg), str(tmp_path_factory.mktemp("bf16" if half else "fp32")))
  return summaries


def test_bfloat16_quickstart_is_within_a_point_of_float32(quickstart_runs):
  fp32, bf16 = quickstart_runs[False], quickstart_runs[True]
  assert fp32["val_accuracy"] > 0.78  # learnt: the full quickstart ends near 0.85
  assert abs(bf16["val_accuracy"] - fp32["val_accuracy"]) <= 0.01
  # Exactly floor(0.95 N) of the N = 266,200 kernel weights are zero (as a float32 fraction).
  exact = float(np.float32(np.floor(0.95 * 266_200)) / np.float32(266_200))
  assert bf16["weight_sparsity"] == fp32["weight_sparsity"] == exact


def test_sam_norm_is_accumulated_in_float32():
  """bfloat16 gradients (256, then 4096 ones): summed in bfloat16 the ones vanish next to
  256^2 (its spacing there is 512) and the norm would be 256; SAM uses sqrt(256^2 + 4096)."""
  g = {"w": jnp.ones(4097, jnp.bfloat16).at[0].set(256)}
  x = {"w": jnp.zeros(4097, jnp.bfloat16)}
  tx = sam_gradient(rho=1.0)
  perturbed, _ = jax.jit(lambda: tx.update(g, tx.init(x), x,
                                           value_and_grad_fn=lambda p: (0.0, p)))()
  assert perturbed["w"].dtype == jnp.bfloat16
  assert float(perturbed["w"][0]) == pytest.approx(256 / np.sqrt(256**2 + 4096), rel=2**-8)


# A NaN image in the 8th training batch: the loss of step 8 is NaN. Checkpoints every 4 steps:
# the state of step 8 must not be saved, the one of step 4 must stay.
_POISONED_RUN = """
import sys
import numpy as np
from safe_dist import sharding
real, calls = sharding.global_batch, []
def poisoned(mesh, local):
  calls.append(1)
  if len(calls) == 8:
    local = dict(local, image=np.full_like(local["image"], np.nan))
  return real(mesh, local)
sharding.global_batch = poisoned
from safe_dist import train
train.run()
"""


def test_non_finite_step_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config", "config:debug", "--workdir", str(workdir), "--sharpness_every", "0",
          "--bnt_sample_size", "0", "--config", "set:train.checkpoint_every_steps=4"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _POISONED_RUN, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  # The loss itself may stay finite (XLA's relu, a max, drops the NaN from the forward pass);
  # the gradient norm cannot.
  assert re.search(r"error: training stopped: (train/loss|optim/grad_norm) is nan at step 8 "
                   r"\(the first non-finite value\); the last checkpoint, of step 4, is finite "
                   r"and kept", result.stderr), result.stderr[-3000:]
  assert not (workdir / "summary.json").exists()
  exp = workdir_lib.stored_experiment(str(workdir))
  checkpointer = Checkpointer(str(workdir / "checkpoints"))
  assert checkpointer.all_steps() == [4]
  state = checkpointer.restore(4, run_setup.setup(exp).abstract_state)
  checkpointer.close()
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))
