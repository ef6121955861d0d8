"""The examples run: quickstart, and the GPT main job's tiny configuration."""
import json
import runpy
import sys

import jax

from examples import train_gpt


def test_train_gpt_tiny_learns(tmp_path, capsys, interpret):
  del interpret  # train_gpt picks interpret mode off the GPU by itself
  out = tmp_path / "run.json"
  result = train_gpt.main(["--config", "tiny", "--steps", "40", "--output",
                           str(out)])
  last_line = capsys.readouterr().out.strip().splitlines()[-1]
  summary = json.loads(last_line)
  for key in ("initial_loss", "final_loss", "tokens_per_s", "val_loss"):
    assert summary[key] == result[key]
  assert summary["initial_loss"] > 5.0  # ~ln(256): bytes start uniform
  assert summary["final_loss"] < summary["initial_loss"] - 1.5
  assert summary["tokens_per_s"] > 0
  assert summary["interpret"] == (jax.default_backend() != "gpu")
  assert json.loads(out.read_text())["losses"][0][1] == summary["initial_loss"]


def test_quickstart_runs(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["quickstart.py"])
  runpy.run_path("examples/quickstart.py", run_name="__main__")
  assert "dq (2, 256, 8, 64)" in capsys.readouterr().out


def _train_gpt_subprocess(*args):
  """train_gpt's summary from a fresh process with 2 forced CPU devices."""
  import os
  import subprocess
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run(
      [sys.executable, "examples/train_gpt.py", "--config", "tiny",
       "--steps", "12", *args], env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_gpt_data_and_context_parallel_match_one_device():
  # Same data, same seed: sharding the batch or the sequence (ring
  # attention, zig-zag order) changes the summation order only.
  one = _train_gpt_subprocess()
  for parallel in ("data", "context"):
    got = _train_gpt_subprocess("--parallel", parallel)
    assert (got["parallel"], got["devices"]) == (parallel, 2)
    for key in ("initial_loss", "final_loss", "val_loss"):
      assert abs(got[key] - one[key]) < 1e-4, (parallel, key, got, one)
    assert got["final_loss"] < got["initial_loss"] - 1.0
