"""Runs fa2-jax once, forward and backward, and checks it against the reference.

On a GPU the kernels are compiled; on a CPU they run in Pallas interpret mode.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import fa2_jax

BATCH, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM = 2, 1024, 8, 2, 64
IS_CAUSAL = True
DTYPE = jnp.bfloat16

on_gpu = jax.default_backend() == "gpu"
if not on_gpu:
  SEQ_LEN = 256  # interpret mode is slow: a smaller problem on a CPU
interpret = not on_gpu

keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (BATCH, SEQ_LEN, HEADS, HEAD_DIM), DTYPE)
k = jax.random.normal(keys[1], (BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM), DTYPE)
v = jax.random.normal(keys[2], (BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM), DTYPE)
dout = jax.random.normal(keys[3], q.shape, DTYPE)


def fwd_bwd(implementation, **kwargs):
  def run(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fa2_jax.flash_attention(
        q, k, v, is_causal=IS_CAUSAL, implementation=implementation, **kwargs),
                       q, k, v)
    return out, *vjp(dout)
  return jax.jit(run)


start = time.perf_counter()
got = jax.block_until_ready(fwd_bwd("triton", interpret=interpret)(q, k, v))
seconds = time.perf_counter() - start
# The reference in float32 on upcast inputs is the yardstick.
f32 = [x.astype(jnp.float32) for x in (q, k, v)]
want = jax.jit(lambda q, k, v: (lambda o, vjp: (o, *vjp(dout.astype(
    jnp.float32))))(*jax.vjp(lambda q, k, v: fa2_jax.flash_attention(
        q, k, v, is_causal=IS_CAUSAL, implementation="xla"), q, k, v)))(*f32)

print(f"fa2-jax on {jax.devices()[0].device_kind} "
      f"({'compiled' if on_gpu else 'interpret mode'}), q {q.shape} "
      f"k/v {k.shape} {jnp.dtype(DTYPE).name} causal={IS_CAUSAL}: "
      f"fwd+bwd in {seconds:.2f} s (with compilation)")
for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
  g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
  err = np.abs(g - w).max()
  print(f"  {name}: max |fa2 - reference(f32)| = {err:.2e}   "
        f"(max |reference| = {np.abs(w).max():.2f})")
  assert np.isfinite(g).all() and err < 0.05 * max(1.0, np.abs(w).max())
print("OK")
