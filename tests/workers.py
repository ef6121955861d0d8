"""Run a worker script in a fresh process (XLA_FLAGS, e.g. forced host
devices, must be set before JAX starts) and collect its JSON lines."""
import json
import os
import subprocess
import sys


def run_worker(script: str, expected_rows: int, timeout: int = 1200):
  """The JSON rows `script` prints; fails with its stderr when fewer than
  `expected_rows` come back."""
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  done = subprocess.run([sys.executable, script], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  rows = [json.loads(line) for line in done.stdout.splitlines()
          if line.startswith("{")]
  assert len(rows) == expected_rows, done.stderr[-3000:]
  return rows
