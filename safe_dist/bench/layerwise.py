"""Benchmark of layer-wise pruning: one LLaMA block, random weights and calibration inputs,
each method timed as `prune_lm` runs it (dense pass with input statistics, pruning, pruned
outputs).

  python -m safe_dist.bench.layerwise                      # LLaMA-2-7B's block (a GPU's size)
  python -m safe_dist.bench.layerwise --scale 8 --nsamples 16 --seqlen 256 --epochs 2   # CPU

`--scale k` divides the width, heads and MLP of LLaMA-2-7B's block (4096, 32 heads, 11008) by
k. Each method runs twice on the same block; the second run's seconds are reported (the first
compiles). SAFE's seconds scale with --epochs (the reference runs 30).
"""

import argparse
import dataclasses
import time

import flax.linen as nn
import jax

from safe_dist import sharding
from safe_dist.bench import peak_memory_line
from safe_dist.layerwise import pruner
from safe_dist.layerwise.safe_block import SafeBlockConfig
from safe_dist.models.llama import DecoderBlock, Llama, LlamaConfig

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=32)


def block_config(scale: int) -> LlamaConfig:
  c = LLAMA2_7B
  return dataclasses.replace(c, hidden_size=c.hidden_size // scale,
                             intermediate_size=c.intermediate_size // scale,
                             num_attention_heads=c.num_attention_heads // scale,
                             num_key_value_heads=c.num_key_value_heads // scale)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=int, default=1)
  parser.add_argument("--nsamples", type=int, default=128)
  parser.add_argument("--seqlen", type=int, default=2048)
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--methods", default=",".join(pruner.METHODS))
  args = parser.parse_args(argv)
  config = block_config(args.scale)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  block = DecoderBlock(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.nsamples, args.seqlen, config.hidden_size))
  boxed = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x[:1]))
  shardings = sharding.shardings_for(boxed["params"], mesh)
  params = jax.jit(lambda: nn.unbox(block.init(jax.random.PRNGKey(0), x[:1]))["params"],
                   out_shardings=shardings)()
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  print(f"block of LLaMA-2-7B / {args.scale}: width {config.hidden_size}, MLP "
        f"{config.intermediate_size}, {config.num_attention_heads} heads; {args.nsamples} x "
        f"{args.seqlen} calibration tokens; {len(jax.devices())} {jax.devices()[0].platform} "
        f"device(s)")
  print(f"{'method':<10} {'seconds':>9} {'rel. error':>11}")
  model = Llama(config)
  for method in args.methods.split(","):
    safe = SafeBlockConfig(epochs=args.epochs, batch_size=args.batch_size,
                           warmup_epochs=min(2, args.epochs))
    cfg = pruner.LayerwiseConfig(method=method, sparsity=0.5, safe=safe, chunk=args.batch_size)
    block_pruner = pruner.BlockPruner(model, mesh, shardings, cfg)
    for _ in range(2):
      start = time.perf_counter()
      _, out, error = block_pruner.prune(params, x, jax.random.PRNGKey(2))
      jax.block_until_ready(out)
      seconds = time.perf_counter() - start
    print(f"{method:<10} {seconds:>9.2f} {error:>11.4g}", flush=True)
  print(peak_memory_line())


if __name__ == "__main__":
  main()
