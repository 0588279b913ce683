"""bench.projection runs end to end at toy sizes and prints its tables (its counts are checked
inside: a wrong mask count stops it)."""

from safe_dist.bench import projection


def test_size_table(capsys):
  projection.main(["--min_log2", "12", "--max_log2", "12", "--repeats", "1",
                   "--sort_max_log2", "12"])
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| 12 |")]
  assert len(rows) == 1 and "nan" not in rows[0]


def test_leaves_table(capsys):
  projection.main(["--leaves", "1,3", "--leaves_log2", "12", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "| leaves | 1 device compile s | 1 device ms | 8 devices compile s | 8 devices ms |" in out
  rows = [l.split("|")[1:-1] for l in out.splitlines() if l.startswith(("| 1 |", "| 3 |"))]
  assert len(rows) == 2 and all(float(v) > 0 for row in rows for v in row[1:])
