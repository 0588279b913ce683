"""python -m safe_dist.bench.step on a tiny setting: a row per method in both tables, ratios
to dense, and per-device state bytes that shrink under FSDP."""

import re

import pytest

from safe_dist.bench import step


def _table(out: str, first_column: str) -> dict[str, list[str]]:
  """{row name: cells} of the markdown table whose header starts with `first_column`."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    name, *cells = [c.strip() for c in line.strip("|").split("|")]
    rows[name] = cells
  return rows


@pytest.mark.slow
def test_every_method_timed_and_its_state_measured(capsys):
  # One device (the programs compile fastest there), two-step windows: a window holds one
  # dual update. LeNet's state under FSDP over 1 and 8 devices.
  step.main(["--model", "LeNet300-100", "--batch_size", "8", "--dual_update_interval", "2",
             "--warmup", "1", "--windows", "1", "--devices", "1",
             "--memory_config", "debug", "--memory_devices", "1,8"])
  out = capsys.readouterr().out
  timing = _table(out, "method")
  assert list(timing) == list(step.METHODS), out
  assert timing[step.DENSE][1] == timing[step.DENSE][3] == "1.00"
  for cells in timing.values():
    assert all(float(c) > 0 for c in cells), out
  assert re.search(r"SAFE / SAM: [0-9.]+x per step, [0-9.]+x amortised", out), out

  memory_out = out[out.index("train state of config:debug"):]
  memory = {name: [float(c) for c in cells]
            for name, cells in _table(memory_out, "method").items()}
  assert list(memory) == list(step.METHODS), memory_out
  for name, (one, eight) in memory.items():
    assert eight < one / 4, (name, one, eight)  # sharded, up to small replicated leaves
  # SAFE keeps a = x + u and a bit-packed mask: more than dense, less than twice dense.
  assert memory[step.DENSE][0] < memory[step.SAFE][0] < 2 * memory[step.DENSE][0]
  parts = _table(memory_out[memory_out.index("SAFE by part"):], "part")
  assert set(parts) == {"params", "optimizer", "sparsifier", "batch_stats", "total"}
