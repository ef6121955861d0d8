"""Peak device memory of forward+backward, measured per implementation.

JAX cannot reset a device's peak-memory counter, so each implementation runs
in a fresh process over increasing sequence lengths: the peak after a case is
that case's own peak (memory grows with T for every implementation). Batch
and heads stay fixed, so the O(T) vs O(T^2) shapes show.

Compilation can allocate device memory of its own (XLA's autotuning of
fusions: 68 MiB for fa2-jax's step at 1k on an H100, before anything runs),
which would pass for the step's peak at short sequences. So each worker runs
twice over a shared persistent compilation cache: the first fills it, the
second loads the executables and measures the steps alone.

    python -m fa2_jax.bench.memory --impl xla --seq-lens 1024,2048 ...
prints one JSON line per sequence length (the worker).
"""
import argparse
import json
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from fa2_jax.bench import implementations, timing


def use_compilation_cache(path):
  """Persist every executable under `path` (and load it from there)."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def measure(impl, *, seq_lens, batch, heads, head_dim, is_causal, dtype,
            interpret):
  """Yields a row per sequence length, in this process (the worker)."""
  device = jax.devices()[0]
  for seq_len in sorted(seq_lens):
    row = dict(impl=impl, seq_len=seq_len, batch=batch, heads=heads,
               head_dim=head_dim, causal=is_causal, pass_="fwd+bwd",
               dtype=jnp.dtype(dtype).name)
    try:
      fn = implementations.attention_fn(impl, is_causal=is_causal,
                                        interpret=interpret)
      q, k, v, dout = timing.inputs(batch, seq_len, heads, head_dim, dtype)
      step, args = timing.step_and_args(fn, "fwd+bwd", q, k, v, dout)
      jax.block_until_ready(step(*args))
      stats = device.memory_stats()
      if not stats or "peak_bytes_in_use" not in stats:
        raise NotImplementedError(f"no device memory statistics on "
                                  f"{device.platform}")
      row["peak_bytes"] = int(stats["peak_bytes_in_use"])
    except Exception as e:  # recorded: OOM, unsupported, ...
      row["error"] = timing.describe(e)
    yield row


def sweep(impls, *, seq_lens, batch, heads, head_dim, is_causal, dtype,
          interpret, timeout_s=900):
  """Runs `measure` in fresh subprocesses per implementation (a warm-up one
  filling a compilation cache, then the measured one); returns rows."""
  rows = []
  for impl in impls:
    cmd = [sys.executable, "-m", "fa2_jax.bench.memory", "--impl", impl,
           "--seq-lens", ",".join(map(str, seq_lens)), "--batch", str(batch),
           "--heads", str(heads), "--head-dim", str(head_dim),
           "--dtype", jnp.dtype(dtype).name]
    cmd += ["--causal"] if is_causal else []
    cmd += ["--interpret"] if interpret else []
    try:
      with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):  # the second run loads what the first compiled
          done = subprocess.run(cmd + ["--cache-dir", cache],
                                capture_output=True, text=True,
                                timeout=timeout_s, check=False)
      got = [json.loads(line) for line in done.stdout.splitlines()
             if line.startswith("{")]
      if not got:
        raise RuntimeError(f"memory worker for {impl} exited "
                           f"{done.returncode}: {done.stderr.strip()[-300:]}")
      rows += got
    except Exception as e:
      rows.append(dict(impl=impl, pass_="fwd+bwd", head_dim=head_dim,
                       error=timing.describe(e)))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description="memory worker")
  parser.add_argument("--impl", required=True)
  parser.add_argument("--seq-lens", required=True)
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--heads", type=int, required=True)
  parser.add_argument("--head-dim", type=int, required=True)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--interpret", action="store_true")
  parser.add_argument("--cache-dir", default=None,
                      help="a persistent compilation cache to use")
  args = parser.parse_args(argv)
  if args.cache_dir:
    use_compilation_cache(args.cache_dir)
  for row in measure(args.impl, seq_lens=[int(s) for s in
                                          args.seq_lens.split(",")],
                     batch=args.batch, heads=args.heads,
                     head_dim=args.head_dim, is_causal=args.causal,
                     dtype=jnp.dtype(args.dtype), interpret=args.interpret):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
