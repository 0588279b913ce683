"""python -m safe_dist.bench.pooling on a tiny setting: a row per (model, method), both poolings
timed, and the two train states bit-identical after the same steps."""

import pytest

from safe_dist.bench import pooling


@pytest.mark.slow
def test_both_poolings_timed_and_their_states_identical(capsys):
  pooling.main(["--models", "LeNet5", "--methods", "dense,SAFE", "--batch_size", "8",
                "--dual_update_interval", "2", "--warmup", "2", "--windows", "2"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| LeNet5 |")]
  assert len(rows) == 4, out  # each row printed as measured, then the table
  for row in rows:
    _, _, method, flax_ms, ours_ms, speedup, same, _ = [c.strip() for c in row.split("|")]
    assert method in ("dense", "SAFE") and float(flax_ms) > 0 and float(ours_ms) > 0, row
    assert speedup.endswith("x") and float(speedup[:-1]) > 0, row
    assert same == "yes", row  # 6 steps, a dual update every 2: the same numbers


def test_a_model_without_max_pooling_is_refused():
  with pytest.raises(SystemExit, match="unknown model 'ResNet20'; allowed: LeNet5, VGG11"):
    pooling.main(["--models", "ResNet20"])
