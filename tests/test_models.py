"""Models: shapes, parameter counts, logical axis names, batch statistics, normalisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from safe_dist import models
from safe_dist import sharding

CIFAR = ((32, 32, 3), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
MNIST = ((28, 28, 1), (0.13,), (0.31,))


def abstract_init(name, data=CIFAR, num_classes=10, dtype=jnp.float32):
  shape, mean, std = data
  model = models.create_model(name, num_classes, mean, std, dtype=dtype)
  x = jnp.zeros((2, *shape), jnp.float32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), nn.unbox(boxed))
  return boxed, out


def num_params(boxed):
  return sum(x.size for x in jax.tree.leaves(nn.unbox(boxed)["params"]))


def kernel_specs(boxed):
  specs = nn.get_partition_spec(boxed["params"])
  shapes = nn.unbox(boxed["params"])
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  spec_of = dict(jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0])
  return {jax.tree_util.keystr(p): (x.shape, spec_of[p]) for p, x in flat
          if p[-1].key == "kernel"}


def test_names():
  assert len(models.VISION_MODEL_NAMES) == 16 and models.MODEL_NAMES[16:] == ("llama",)
  assert {"VGG19-bn", "ResNet32x2", "LeNet5"} <= set(models.MODEL_NAMES)


@pytest.mark.parametrize("name", models.VISION_MODEL_NAMES)
def test_init_shapes_and_axis_names(name):
  boxed, out = abstract_init(name, num_classes=100)
  assert out.shape == (2, 100) and out.dtype == jnp.float32
  # has_batch_norm decides whether the trainer keeps and checkpoints batch statistics.
  assert bool(jax.tree.leaves(boxed.get("batch_stats", {}))) == models.has_batch_norm(name)
  specs = kernel_specs(boxed)
  assert specs
  for path, (shape, spec) in specs.items():
    want = models.layers.CONV_AXES if len(shape) == 4 else models.layers.DENSE_AXES
    assert tuple(spec) == want, path


@pytest.mark.parametrize("name", ["LeNet300-100", "LeNet5", "ResNet20", "VGG11", "VGG19-bn"])
def test_mnist_shapes(name):
  _, out = abstract_init(name, data=MNIST)
  assert out.shape == (2, 10)


@pytest.mark.parametrize("name,data,expected", [
    ("LeNet300-100", MNIST, 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),  # 266,610
    # Caffe's LeNet-5: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so 4 * 4 * 50 inputs
    # to the 500-wide dense layer.
    ("LeNet5", MNIST, (5 * 5 * 1 * 20 + 20) + (5 * 5 * 20 * 50 + 50) + (4 * 4 * 50 * 500 + 500)
     + (500 * 10 + 10)),  # 431,080
    # 0.27M: option A's 269,722 plus the two 1x1 projection convs and their BN scale/bias.
    ("ResNet20", CIFAR, 269_722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)),  # 272,474
    ("ResNet32", CIFAR, 464_154 + 16 * 32 + 32 * 64 + 2 * (32 + 64)),  # 466,906
    # CIFAR VGG19-bn with one linear layer has 20,040,522; safe-jax's head adds 512 -> 512.
    ("VGG19-bn", CIFAR, 20_040_522 + 2 * (512 * 512 + 512)),  # 20,565,834
])
def test_param_counts(name, data, expected):
  boxed, _ = abstract_init(name, data=data)
  assert num_params(boxed) == expected


def test_lenet5_layers():
  boxed, out = abstract_init("LeNet5", data=MNIST)
  assert num_params(boxed) == 431_080 and out.dtype == jnp.float32
  shapes = {path: shape for path, (shape, _) in kernel_specs(boxed).items()}
  assert shapes == {"['conv1']['kernel']": (5, 5, 1, 20), "['conv2']['kernel']": (5, 5, 20, 50),
                    "['fc1']['kernel']": (800, 500), "['head']['kernel']": (500, 10)}
  assert not models.has_batch_norm("LeNet5")


def numpy_max_pool_2x2(x, padding):
  """Float64 reference: the max of each 2x2 window, stride 2; SAME pads an odd side at its end."""
  n, h, w, c = x.shape
  oh, ow = ((h + 1) // 2, (w + 1) // 2) if padding == "SAME" else (h // 2, w // 2)
  out = np.empty((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
  return out


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("h,w", [(8, 8), (7, 5), (1, 1), (6, 3)])
def test_max_pool_2x2_matches_numpy_and_flax(padding, h, w):
  rng = np.random.default_rng()
  x = rng.integers(-3, 4, size=(2, h, w, 3)).astype(np.float64)  # small integers: many ties
  got = models.layers.max_pool_2x2(jnp.asarray(x, jnp.float32), padding)
  np.testing.assert_array_equal(np.asarray(got, np.float64), numpy_max_pool_2x2(x, padding))
  np.testing.assert_array_equal(
      got, nn.max_pool(jnp.asarray(x, jnp.float32), (2, 2), strides=(2, 2), padding=padding))
  # The gradient of sum(pool(x) * g): each window's g goes to its first maximum (row-major), as
  # flax's select-and-scatter gives it, ties included.
  g = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  grad = np.asarray(jax.grad(lambda v: jnp.sum(models.layers.max_pool_2x2(v, padding) * g))(
      jnp.asarray(x, jnp.float32)), np.float64)
  expected = np.zeros_like(x)
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
  for b, i, j, k in np.ndindex(*got.shape):
    window = xp[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].ravel()
    di, dj = divmod(int(np.argmax(window)), 2)
    expected[b, 2 * i + di, 2 * j + dj, k] = g[b, i, j, k]
  np.testing.assert_array_equal(grad, expected)
  flax_grad = jax.grad(lambda v: jnp.sum(
      nn.max_pool(v, (2, 2), strides=(2, 2), padding=padding) * g))(jnp.asarray(x, jnp.float32))
  np.testing.assert_array_equal(grad, flax_grad)


def test_max_pool_2x2_rejects_other_padding():
  with pytest.raises(ValueError, match="padding must be 'VALID' or 'SAME'"):
    models.layers.max_pool_2x2(jnp.zeros((1, 4, 4, 1)), "FULL")


def test_resnet_x2_doubles_widths():
  boxed, _ = abstract_init("ResNet20x2")
  shapes = nn.unbox(boxed)["params"]
  assert shapes["conv_init"]["kernel"].shape == (3, 3, 3, 32)
  assert shapes["stage3_block1"]["proj_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert "bias" not in shapes["conv_init"]


def test_half_precision_keeps_float32_params_and_logits():
  boxed, out = abstract_init("ResNet20", dtype=jnp.bfloat16)
  assert out.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(boxed)))


@pytest.mark.parametrize("name,data", [("LeNet300-100", MNIST), ("LeNet5", MNIST),
                                       ("ResNet20", CIFAR),
                                       ("VGG11-bn", CIFAR)])
def test_apply_normalises_and_updates_batch_stats(name, data):
  shape, mean, std = data
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
  model = models.create_model(name, 10, mean, std)
  shifted = models.create_model(name, 10, [m + 0.3 for m in mean], std)
  mutable = ["batch_stats"] if models.has_batch_norm(name) else []

  @jax.jit  # one compilation: op-by-op execution of a ResNet on CPU is slow
  def run(x):
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), x[:1], train=False))
    logits = model.apply(variables, x, train=False)
    train_logits, new_vars = model.apply(variables, x, train=True, mutable=mutable)
    return variables, logits, shifted.apply(variables, x, train=False), train_logits, new_vars

  variables, logits, shifted_logits, train_logits, new_vars = run(x)
  assert np.all(np.isfinite(logits))
  assert not np.allclose(logits, shifted_logits)
  if mutable:
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                           new_vars["batch_stats"])
    assert all(jax.tree.leaves(changed))
  else:
    np.testing.assert_allclose(train_logits, logits, rtol=1e-6)


def test_unknown_name():
  with pytest.raises(ValueError, match="--model.*ResNet20"):
    models.create_model("ResNet18", 10, (0.5,), (0.5,))
  with pytest.raises(ValueError, match="--model"):
    models.has_batch_norm("AlexNet")


def test_kernels_shard_over_fsdp_and_tensor():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  boxed, _ = abstract_init("VGG11-bn")
  shardings = sharding.shardings_for(boxed["params"], mesh)
  assert shardings["conv2_1"]["kernel"].spec == P(None, None, "fsdp", "tensor")
  assert shardings["bn2_1"]["scale"].spec == P("tensor",)
  assert shardings["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["conv1_1"]["kernel"].spec == P(None, None, None, "tensor")  # 3 input channels
