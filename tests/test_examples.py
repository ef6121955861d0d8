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
