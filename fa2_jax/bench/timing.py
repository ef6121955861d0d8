"""Timing one case: inputs, FLOP count, jitted steps, medians.

FLOPs as in the FlashAttention-2 paper: forward 4 B N T S H (halved when
causal), backward 2.5x the forward, forward+backward 3.5x. Inputs are rotated
among `ROTATIONS` sets so that consecutive calls do not find the previous
call's data in L2.
"""
import math
import shutil
import statistics
import subprocess
import time

import jax

PASSES = ("fwd", "bwd", "fwd+bwd")
ROTATIONS = 3
_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def flops(batch, seq_len, heads, head_dim, *, is_causal, pass_, seq_len_k=None):
  """FLOPs of the FA2 paper for one call of `pass_`."""
  seq_len_k = seq_len if seq_len_k is None else seq_len_k
  f = 4.0 * batch * heads * seq_len * seq_len_k * head_dim
  f = f / 2 if is_causal else f
  return f * _PASS_FACTOR[pass_]


def inputs(batch, seq_len, heads, head_dim, dtype, *, kv_heads=None, seed=0):
  """q [B, T, N, H], k, v [B, T, K, H], dout like q; normal(0, 1)."""
  kv_heads = heads if kv_heads is None else kv_heads
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq_len, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(ks[2], (batch, seq_len, kv_heads, head_dim), dtype)
  dout = jax.random.normal(ks[3], q.shape, dtype)
  return q, k, v, dout


def step_and_args(fn, pass_, q, k, v, dout):
  """(jitted step, its argument tuple) for one pass of fn(q, k, v).

  The bwd step takes the pullback itself as an argument (a pytree of the
  forward's residuals), so only the backward runs under the timer.
  """
  if pass_ == "fwd":
    return jax.jit(fn), (q, k, v)
  if pass_ == "fwd+bwd":
    def fwd_bwd(q, k, v, dout):
      out, pullback = jax.vjp(fn, q, k, v)
      return out, pullback(dout)
    return jax.jit(fwd_bwd), (q, k, v, dout)
  if pass_ == "bwd":
    _, pullback = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v))(q, k, v)
    return jax.jit(lambda pullback, dout: pullback(dout)), (pullback, dout)
  raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


# A timed run of back-to-back calls lasts at least this long (0: exactly
# `calls` calls). Each run starts from an idle GPU; over 10 calls a 0.4 ms
# kernel read 2-6% slower than over 25 ms in the same process on an H100,
# cuDNN's as much (benchmarks/NOTES.md item 48).
MIN_RUN_S = 0.025


def sustain(step, arg_sets, seconds):
  """Calls step over `arg_sets` for `seconds`, untimed: the GPU reaches the
  clocks it holds under this case's own load. An H100 at its 700 W cap
  drops from 1980 MHz to 1.4-1.8 GHz within a fraction of a second, by how
  much depending on the kernel, so without this a case's time depends on
  what ran before it (benchmarks/NOTES.md item 62)."""
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready([step(*args) for args in arg_sets])


def time_calls(step, arg_sets, *, calls=10, trials=5, min_run_s=MIN_RUN_S,
               sustain_s=0.0):
  """Median seconds per call over `trials` runs of back-to-back calls,
  cycling through `arg_sets`; two warm-up calls first, then `sustain_s`
  seconds of untimed calls (see `sustain`). A run makes `calls` calls, or as many
  more as it takes to last `min_run_s` (estimated from one untimed run of
  `calls`), so that short kernels are timed on the device, not by the
  host's latency to start them."""
  for args in arg_sets[:2]:
    jax.block_until_ready(step(*args))
  sustain(step, arg_sets, sustain_s)

  def run(n):
    start = time.perf_counter()
    for i in range(n):
      result = step(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(result)
    return time.perf_counter() - start

  if min_run_s > 0:
    calls = max(calls, math.ceil(calls * min_run_s / run(calls)))
  return statistics.median(run(calls) / calls for _ in range(trials))


def time_case(fn, pass_, *, batch, seq_len, heads, head_dim, dtype,
              kv_heads=None, calls=10, trials=5, min_run_s=MIN_RUN_S,
              sustain_s=0.0):
  """Seconds per call of `pass_` of fn, with rotated inputs."""
  arg_sets, step = [], None
  for seed in range(ROTATIONS):
    q, k, v, dout = inputs(batch, seq_len, heads, head_dim, dtype,
                           kv_heads=kv_heads, seed=seed)
    step, args = step_and_args(fn, pass_, q, k, v, dout)
    arg_sets.append(args)
  return time_calls(step, arg_sets, calls=calls, trials=trials,
                    min_run_s=min_run_s, sustain_s=sustain_s)


def gpu_clocks() -> dict:
  """The first GPU's SM clock (MHz) and board power (W) as nvidia-smi reads
  them now: right after a case's timed runs, the clocks it ran at (under a
  power cap they fall, see `sustain`). {} where there is no nvidia-smi or
  it says nothing usable."""
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return {}
  try:
    out = subprocess.run([exe, "--query-gpu=clocks.sm,power.draw",
                          "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout
    clock, power = (float(x) for x in out.splitlines()[0].split(","))
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return {}
  return dict(sm_clock_mhz=int(clock), power_w=power)


def describe(error: Exception) -> str:
  """One line for a failed case; out-of-memory named as such."""
  text = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return "OOM: " + text
  return text
