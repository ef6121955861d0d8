"""The benchmark CLI's --quick path writes valid JSON and PNGs; --compare
reads them back. (Speed itself is measured on a GPU, not asserted here.)"""
import json
import re
import subprocess
import time

import jax.numpy as jnp
import pytest

from fa2_jax import backends, benchmark
from fa2_jax.bench import timing


def test_quick_writes_json_and_plots(tmp_path, capsys):
  out = tmp_path / "quick"
  benchmark.main(["--quick", "--output-dir", str(out), "--seq-lens", "128",
                  "--causal", "true", "--impls", "fa2-triton,xla,fa2-mosaic"])
  results = json.loads((out / "results.json").read_text())
  rows = results["rows"]
  assert results["environment"]["jax"]
  speed = [r for r in rows if r.get("kind") != "memory"]
  assert {(r["impl"], r["pass_"]) for r in speed} == {
      (i, p) for i in ("fa2-triton", "xla", "fa2-mosaic")
      for p in ("fwd", "bwd", "fwd+bwd")}
  for r in speed:
    assert r["seq_len"] == 128 and r["causal"] is True and r["device"]
    if r["impl"] == "fa2-mosaic" and not backends.is_hopper():
      # Needs a Hopper GPU: the error is recorded, the sweep goes on.
      assert "NotImplementedError" in r["error"]
    else:
      assert r["ms"] > 0 and r["tflops"] > 0, r
  memory = [r for r in rows if r.get("kind") == "memory"]
  assert {r["impl"] for r in memory} == {"fa2-triton", "xla"}
  for name in ("speed_fwd.png", "speed_bwd.png", "speed_fwd_bwd.png",
               "memory.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| 128 | 64 | True | fwd+bwd |" in capsys.readouterr().out
  benchmark.main(["--compare", str(out / "results.json"), "--baseline", "xla",
                  "--output-dir", str(tmp_path / "compare")])
  table = capsys.readouterr().out
  assert "fa2-triton / xla" in table and "| 128 | 64 | True | bwd |" in table
  assert (tmp_path / "compare" / "memory.png").exists()


def test_no_memory_writes_no_memory_plot(tmp_path, capsys):
  """--no-memory: speed plots only, and --compare of those results draws
  no empty memory figure either."""
  out = tmp_path / "quick"
  benchmark.main(["--quick", "--no-memory", "--output-dir", str(out),
                  "--seq-lens", "128", "--causal", "false", "--passes",
                  "fwd", "--impls", "xla"])
  assert (out / "speed_fwd.png").exists()
  assert not (out / "memory.png").exists()
  benchmark.main(["--compare", str(out / "results.json"), "--baseline", "xla",
                  "--output-dir", str(tmp_path / "compare")])
  assert not (tmp_path / "compare" / "memory.png").exists()
  assert "| 128 | 64 | False | fwd |" in capsys.readouterr().out


def test_flop_counts_follow_the_paper():
  f = timing.flops(2, 1024, 16, 64, is_causal=False, pass_="fwd")
  assert f == 4 * 2 * 16 * 1024 * 1024 * 64
  assert timing.flops(2, 1024, 16, 64, is_causal=True, pass_="bwd") == (
      pytest.approx(f / 2 * 2.5))
  assert timing.flops(2, 1024, 16, 64, is_causal=False,
                      pass_="fwd+bwd") == pytest.approx(3.5 * f)


def test_failures_are_recorded_not_raised():
  row = benchmark.run_case("no-such-impl", seq_len=64, head_dim=32,
                           is_causal=False, pass_="fwd")
  assert row["error"].startswith("ValueError: unknown implementation")


def test_short_calls_are_timed_over_a_longer_run():
  """A run lasts min_run_s however short a call is: the calls are the
  device's, not the host's start-up latency of a few of them."""
  counts = []

  def step(x):
    counts.append(1)
    time.sleep(0.001)
    return x

  sets = [(jnp.zeros(()),)]
  seconds = timing.time_calls(step, sets, calls=2, trials=1, min_run_s=0.0)
  assert len(counts) == 1 + 2 and seconds >= 0.001  # one warm-up set
  counts.clear()
  seconds = timing.time_calls(step, sets, calls=2, trials=3, min_run_s=0.02)
  # 1 warm-up, 2 to estimate, then 3 runs of ~0.02 s / ~1.1 ms calls: at
  # least 5, not 2 (a host stall in the estimate, as on a busy 2-core CI
  # machine, has made it ~3x too long: 7 calls a run), at most 21.
  runs = (len(counts) - 3) / 3
  assert 5 <= runs <= 21 and 0.001 <= seconds < 0.002, (runs, seconds)


def test_sustain_runs_untimed_calls_before_the_timed_runs():
  """`sustain_s`: the case runs for that long, over every input set, before
  its timed runs start (the GPU at its own load's clocks), and the time is
  still per call, not stretched by those calls."""
  calls = []

  def step(x):
    calls.append(float(x))
    time.sleep(0.002)
    return x

  sets = [(jnp.zeros(()),), (jnp.ones(()),)]
  start = time.perf_counter()
  seconds = timing.time_calls(step, sets, calls=2, trials=1, min_run_s=0.0,
                              sustain_s=0.05)
  sustained = calls[2:-2]  # between the warm-up and the timed run
  assert time.perf_counter() - start >= 0.05
  assert len(sustained) >= 0.05 / 0.004 and set(sustained) == {0.0, 1.0}
  assert 0.002 <= seconds < 0.01, seconds


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_sustain_must_be_finite_seconds(value, capsys):
  """--sustain-s below 0 or not finite is an error naming the flag and the
  value, not a case timed without it (or never timed)."""
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--sustain-s", value])
  assert (f"--sustain-s: expected finite seconds >= 0, got {float(value)}"
          in capsys.readouterr().err)
  assert benchmark.parse_args(["--sustain-s", "1.5"]).sustain_s == 1.5


def test_gpu_clocks_read_nvidia_smi_or_nothing(monkeypatch):
  """A row's clocks come from nvidia-smi's first GPU; without one, or with
  output it cannot parse, the row has none (never a made-up number)."""
  monkeypatch.setattr(timing.shutil, "which", lambda name: "/bin/nvidia-smi")
  replies = iter(["1710, 699.31\n1980, 70.2\n", "[N/A], [N/A]\n", ""])
  monkeypatch.setattr(timing.subprocess, "run", lambda *a, **k:
                      subprocess.CompletedProcess(a, 0, next(replies), ""))
  assert timing.gpu_clocks() == dict(sm_clock_mhz=1710, power_w=699.31)
  assert timing.gpu_clocks() == {}
  assert timing.gpu_clocks() == {}
  monkeypatch.setattr(timing.shutil, "which", lambda name: None)
  assert timing.gpu_clocks() == {}


def test_ratio_is_to_the_fastest_of_several_baselines():
  """`--baseline cudnn,tokamax-mosaic`: each row's ratio is to the faster of
  the two there (the issue's bar), and a failed baseline does not count."""
  from fa2_jax.bench import report
  case = dict(seq_len=1024, head_dim=64, causal=False)
  rows = [dict(impl="fa2-mosaic", pass_="fwd", tflops=300.0, **case),
          dict(impl="cudnn", pass_="fwd", tflops=200.0, **case),
          dict(impl="tokamax-mosaic", pass_="fwd", tflops=250.0, **case),
          dict(impl="fa2-mosaic", pass_="bwd", tflops=300.0, **case),
          dict(impl="cudnn", pass_="bwd", tflops=400.0, **case),
          dict(impl="tokamax-mosaic", pass_="bwd", error="OOM", **case)]
  table = report.ratio_tables(rows, baseline="cudnn,tokamax-mosaic")
  assert "fa2-mosaic / best of cudnn, tokamax-mosaic" in table
  assert "| 1024 | 64 | False | fwd | 300 | 200 | 250 | 1.20 |" in table
  assert "| 1024 | 64 | False | bwd | 300 | 400 | OOM | 0.75 |" in table


@pytest.mark.parametrize("argv,message", [
    (["--baseline", "cudnn,tokamax"], r"--baseline: unknown implementation\(s\) "
     r"\['tokamax'\]; expected names from \["),
    (["--ours", "fa2"], r"--ours: unknown implementation\(s\) \['fa2'\]"),
])
def test_ratio_names_must_be_implementations(argv, message, capsys):
  """A misspelled --baseline or --ours is an error naming the flag, not a
  ratio column of "-"."""
  with pytest.raises(SystemExit):
    benchmark.parse_args(argv)
  assert re.search(message, capsys.readouterr().err)
  args = benchmark.parse_args(["--baseline", "cudnn,tokamax-mosaic",
                               "--ours", "fa2-mosaic"])
  assert args.baseline == "cudnn,tokamax-mosaic" and args.ours == "fa2-mosaic"
