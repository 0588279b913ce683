"""`python -m safe_dist.export`: every format's loader gives back exactly the network a run
ended with (the same logits bit for bit, the same sparsity pattern), for a vision run trained
here (the debug config: SAFE, LeNet, 95%) and for a language model pruned 2:4 as `prune_lm`
writes it; the Hugging Face export reads back through the project's importer bit for bit; bad
requests are refused by flag before any work."""

import json
import math
import os
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_checkpoints import random_weights, write_hf
from helpers import run_module
from trainer_helpers import debug_experiment, replace
from safe_dist import data as data_lib
from safe_dist import evaluation
from safe_dist import language_models
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist import trainer
from safe_dist import workdir as workdir_lib
from safe_dist.checkpointing import Checkpointer
from safe_dist.export import benchmark, cli, codecs, formats, hf_checkpoint, network, sizes
from safe_dist.lm import hf, tokenization
from safe_dist.models.llama import Llama

TINY_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64,
                  tie_word_embeddings=False)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
  """A finished debug run (the one test_eval and test_trainer make: its programs come from the
  compilation cache), and the network it ended with as the evaluation reads it: the latest
  checkpoint through `evaluation.final_network`, with its logits on the test images."""
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  summary = trainer.train_and_evaluate(debug_experiment(), workdir)
  run = run_setup.setup(workdir_lib.stored_experiment(workdir))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  state = checkpointer.restore(checkpointer.latest_step(), run.abstract_state)
  checkpointer.close()
  final = evaluation.final_network(run, state)
  images, labels = data_lib.load_split("synthetic", "test")
  n = run.exp.data.max_eval_examples
  images = images[:n].astype(np.float32) / 255.0
  params = jax.device_get(final.params)
  logits = np.asarray(jax.jit(lambda p, x: run.model.apply({"params": p}, x))(params, images))
  return types.SimpleNamespace(workdir=workdir, summary=summary, params=params, images=images,
                               labels=labels[:n], logits=logits)


@pytest.fixture(scope="module")
def exported(vision_run):
  """What the export reads from the run's workdir (restored onto all 8 devices)."""
  return network.final_network(network.inspect(vision_run.workdir), sharding.MeshConfig())


@pytest.fixture(scope="module")
def pruned_lm(tmp_path_factory):
  """A `prune_lm --out` directory (model.json, params/, summary.json): a tiny random LLaMA
  with a Hugging Face tokenizer, pruned 2:4 by magnitude; and its logits on some tokens."""
  base = tmp_path_factory.mktemp("export_lm")
  source = write_hf(str(base / "hf"), TINY_LLAMA, random_weights(TINY_LLAMA))
  hf_checkpoint.byte_tokenizer().save(os.path.join(source, hf.TOKENIZER_FILE))
  model = language_models.load(source, sharding.MeshConfig())
  params = jax.tree_util.tree_map_with_path(_keep_2_of_4, jax.device_get(model.params))
  directory = str(base / "pruned")
  language_models.save_pruned(directory, model, params, {"description": "magnitude 2:4",
                                                         "source": source})
  workdir_lib.write_json(os.path.join(directory, workdir_lib.SUMMARY_FILE),
                         {"sparsity_type": "2:4", "sparsity_ratio": 0.5})
  tokens = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
  llama = Llama(model.run.exp.model.llama)
  logits = np.asarray(jax.jit(lambda p, t: llama.apply({"params": p}, t))(params, tokens))
  return types.SimpleNamespace(directory=directory, source=source, params=params,
                               config=model.run.exp.model.llama, tokens=tokens, logits=logits)


def _top_n_of_m(x, n, m):
  """x with the n largest magnitudes of every m consecutive inputs (axis -2) kept."""
  groups = np.moveaxis(x, -2, -1).reshape(*x.shape[:-2], x.shape[-1], -1, m)
  order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
  keep = np.zeros(groups.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return np.where(np.moveaxis(keep.reshape(*x.shape[:-2], x.shape[-1], -1), -1, -2), x,
                  np.float32(0))


def _keep_2_of_4(path, x):
  return _top_n_of_m(x, 2, 4) if path[-1].key == "kernel" else x


@pytest.fixture(scope="module")
def lm_network(pruned_lm):
  """What the export reads from the pruned model's directory."""
  return network.final_network(network.inspect(pruned_lm.directory), sharding.MeshConfig())


def _bits(tree):
  """Every leaf's bytes (so -0.0 != +0.0), by path."""
  return {jax.tree_util.keystr(p): np.asarray(x).tobytes()
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_network(loaded, params, logits, inputs):
  """The same predictions bit for bit, the same weights (+0.0 for -0.0) and zero pattern."""
  predictions = loaded.predict(inputs)
  assert predictions.dtype == logits.dtype and np.array_equal(predictions, logits)
  assert predictions.tobytes() == logits.tobytes()
  assert jax.tree.structure(loaded.params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
    assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(a != 0, b != 0)


def _write(net, fmt, directory):
  os.makedirs(directory)
  formats.write(net, fmt, str(directory))
  return formats.load(str(directory))


@pytest.mark.parametrize("fmt", ["masked", "bitmask", "bcoo"])
def test_vision_round_trip_gives_the_final_networks_predictions(vision_run, exported, fmt,
                                                                tmp_path):
  loaded = _write(exported, fmt, tmp_path / fmt)
  _assert_same_network(loaded, vision_run.params, vision_run.logits, vision_run.images)
  assert _bits(loaded.params) == _bits(exported.params)  # bit for bit, signs of zeros too
  # The run's own record of its final network: sparsity and test accuracy.
  assert loaded.weight_sparsity == vision_run.summary["weight_sparsity"] == pytest.approx(0.95)
  accuracy = np.mean(loaded.predict(vision_run.images).argmax(-1) == vision_run.labels)
  assert accuracy == vision_run.summary["val_accuracy"]


def test_stored_layouts(exported, lm_network, tmp_path):
  """What each format stores: masks and packed bits as documented for a kernel of 784 x 300;
  for a 2:4 kernel of 64 inputs x 32 outputs, half the values and 2-bit indices."""
  kernel = exported.params["fc1"]["kernel"]
  kept = int(np.count_nonzero(kernel))
  with np.load(_archive(exported, "bitmask", tmp_path)) as f:
    assert f["params/fc1/kernel:bits"].nbytes == kernel.size // 8
    assert f["params/fc1/kernel:values"].shape == (kept,)
    assert f["params/fc1/bias"].shape == (300,)  # not pruned: stored dense
  with np.load(_archive(lm_network, "nm", tmp_path)) as f:
    assert f["params/layers_0/mlp/down_proj/kernel:values"].shape == (32, 64 // 4, 2)
    assert f["params/layers_0/mlp/down_proj/kernel:indices"].nbytes == 64 * 32 // 2 * 2 // 8
    assert f["params/embed_tokens/embedding"].shape == (256, 32)  # not pruned: dense
  with np.load(_archive(exported, "bcoo", tmp_path)) as f:
    matrix = codecs.to_bcoo({k.split(":")[1]: f[k] for k in f.files
                             if k.startswith("params/fc1/kernel:")})
    assert matrix.nse == kept and np.array_equal(np.asarray(matrix.todense()), kernel)
  with np.load(_archive(exported, "masked", tmp_path)) as f:
    assert np.array_equal(f["params/fc1/kernel:mask"], kernel != 0)


def _archive(net, fmt, tmp_path) -> str:
  directory = tmp_path / f"layout_{fmt}"
  os.makedirs(directory)
  formats.write(net, fmt, str(directory))
  return str(directory / "network.npz")


def test_nm_codec_packs_indices_for_any_n_m():
  rng = np.random.default_rng(0)
  for n, m in [(2, 4), (1, 4), (3, 8), (2, 3), (1, 2)]:
    weights = rng.standard_normal((3, 24, 5)).astype(np.float32)
    x = _top_n_of_m(weights, n, m)
    x[rng.random(x.shape) < 0.2] = 0  # some groups hold fewer than N nonzeros
    parts = codecs.nm_encode(x, n, m)
    assert parts["values"].shape == (3, 5, 24 // m, n)
    assert parts["indices"].nbytes == math.ceil(x.size // m * n * codecs.index_bits(m) / 8)
    assert codecs.nm_decode(parts, n, m).tobytes() == x.tobytes()
  with pytest.raises(ValueError, match="not 2:4 sparse"):
    codecs.nm_encode(np.ones((8, 2), np.float32), 2, 4)


def test_size_table_against_the_dense_npz(exported, tmp_path):
  _write(exported, "bitmask", tmp_path / "bitmask")
  table = sizes.table(str(tmp_path / "bitmask"), exported)
  assert "dense float32 .npz (reference)" in table and "network.npz" in table
  dense = sizes.dense_bytes(exported)
  stored = sizes.file_sizes(str(tmp_path / "bitmask"))["network.npz"]
  assert 0.05 < stored / dense < 0.1  # 5% of the values, 1 bit per weight, the biases


@pytest.mark.parametrize("fmt", ["hf", "nm", "masked", "bitmask", "bcoo"])
def test_language_model_round_trip(pruned_lm, lm_network, fmt, tmp_path):
  loaded = _write(lm_network, fmt, tmp_path / fmt)
  _assert_same_network(loaded, pruned_lm.params, pruned_lm.logits, pruned_lm.tokens)
  assert _bits(loaded.params) == _bits(lm_network.params)


def test_hf_export_is_a_hugging_face_llama_the_importer_reads_bit_for_bit(pruned_lm, lm_network,
                                                                         tmp_path):
  out = str(tmp_path / "hf")
  os.makedirs(out)
  formats.write(lm_network, "hf", out)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
  assert hf.read_config(out) == pruned_lm.config
  tensors = load_file(os.path.join(out, "model.safetensors"))
  assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)  # (out, in)
  assert np.array_equal(tensors["model.layers.0.mlp.down_proj.weight"].T,
                        pruned_lm.params["layers_0"]["mlp"]["down_proj"]["kernel"])
  assert set(tensors) == set(hf.expected_tensors(pruned_lm.config))
  _, params = hf_checkpoint.read(out)  # the project's importer
  assert _bits(params) == _bits(lm_network.params)
  text = "Ĥéllo wörld ✓ \x00\n"
  for name in (pruned_lm.source, out):
    assert np.array_equal(tokenization.get_tokenizer(name).encode(text),
                          tokenization.ByteTokenizer().encode(text))


def test_byte_tokenizer_json_equals_the_byte_tokenizer():
  tokenizer = tokenization.HFTokenizer(hf_checkpoint.byte_tokenizer(), "bytes.json")
  text = "".join(chr(c) for c in range(1, 600)) + " end \U0001F600"
  ids = tokenizer.encode(text)
  assert np.array_equal(ids, tokenization.ByteTokenizer().encode(text))
  assert tokenizer.vocab_size == 256 and tokenizer.decode(ids) == text


def test_language_model_runs_with_bcoo_kernels(lm_network):
  """The benchmark's sparse forward: every linear layer a BCOO matmul, logits as dense's."""
  rows = benchmark.run(lm_network, [2], repeats=1)
  assert [(r.weights, r.batch_size) for r in rows] == [("dense", 2), ("bcoo", 2)]
  assert rows[1].max_abs_diff < 1e-4 and rows[1].argmax_agreement > 0.9
  # 2:4 in BCOO: half the kernel values, each with two int32 indices: 1.5x the kernel bytes.
  kernels = sum(x.nbytes for x in jax.tree.leaves(lm_network.params) if x.ndim == 2) - (
      lm_network.params["embed_tokens"]["embedding"].nbytes)
  assert rows[1].weight_bytes - rows[0].weight_bytes == kernels // 2
  assert "ms/forward" in benchmark.table(rows)


def test_command_line_exports_prints_sizes_and_benchmarks(vision_run, tmp_path):
  out = tmp_path / "out"
  out.mkdir()  # an empty --out is taken
  proc = run_module("safe_dist.export", [
      "--workdir", vision_run.workdir, "--format", "bcoo", "--out", str(out), "--benchmark",
      "--benchmark_batch_sizes", "2", "--benchmark_repeats", "1"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dense float32 .npz (reference)" in proc.stdout
  assert "weight sparsity 95.00%" in proc.stdout
  assert "   bcoo      2" in proc.stdout and "peak RSS" in proc.stdout
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left
  loaded = formats.load(str(out))
  assert loaded.predict(vision_run.images).tobytes() == vision_run.logits.tobytes()


def _flags(**overrides):
  values = dict(format="bitmask", out=None, workdir=None, mesh="-1,1,1", benchmark=False,
                benchmark_batch_sizes=["1"], benchmark_repeats=1)
  values.update(overrides)
  return types.SimpleNamespace(**values)


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
  """Workdirs holding only a run's experiment.json (all the checks read): LeNet at global
  95%, and a ResNet20."""
  base = tmp_path_factory.mktemp("records")
  runs = {"lenet": debug_experiment(),
          "resnet": replace(debug_experiment(), "model", name="ResNet20")}
  for name, exp in runs.items():
    os.makedirs(base / name)
    workdir_lib.write_record(exp, str(base / name))
  return {name: str(base / name) for name in runs}


@pytest.mark.parametrize("overrides,message", [
    ({"format": "onnx"}, "--format must be one of masked, bitmask, bcoo, nm, hf; got 'onnx'"),
    ({"format": None}, "--format must be one of masked, bitmask, bcoo, nm, hf; got None"),
    ({"format": "nm"}, "--format nm needs an N:M run"),
    ({"format": "hf"}, "--format hf writes language models"),
    ({"workdir": "resnet", "benchmark": True}, "--benchmark runs models whose pruned layers"),
    ({"benchmark": True, "benchmark_batch_sizes": ["0"]}, "--benchmark_batch_sizes must be"),
    ({"mesh": "2,2"}, "--mesh must be DATA,FSDP,TENSOR"),
    ({"workdir": "nothing"}, "is neither a training run's workdir"),
])
def test_bad_flags_are_refused_by_name(recorded_runs, tmp_path, overrides, message):
  workdir = recorded_runs.get(overrides.pop("workdir", "lenet"), str(tmp_path))
  with pytest.raises(ValueError) as info:
    cli.check_flags(_flags(workdir=workdir, out=str(tmp_path / "out"), **overrides))
  assert message in str(info.value)
  assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_refused_untouched(recorded_runs, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="--out .* exists and is not empty; nothing was changed"):
    cli.check_flags(_flags(workdir=recorded_runs["lenet"], out=str(tmp_path / "out")))
  assert os.listdir(tmp_path / "out") == ["keep.txt"]
  cli.check_flags(_flags(workdir=recorded_runs["lenet"], out=str(tmp_path / "empty")))


def test_benchmark_batch_sizes_default_by_kind(recorded_runs, pruned_lm):
  lenet, lm = network.inspect(recorded_runs["lenet"]), network.inspect(pruned_lm.directory)
  assert cli.batch_sizes(lenet, _flags(benchmark_batch_sizes=None)) == [1, 128]
  assert cli.batch_sizes(lm, _flags(benchmark_batch_sizes=None)) == [1, 4]
  assert cli.batch_sizes(lm, _flags(benchmark_batch_sizes=["2", "8"])) == [2, 8]
