"""FlashAttention's error rule, shared by every kernel test.

A kernel's error against a float64 "truth" may be at most `factor` (2 for
outputs, 3 for gradients) times the error of the same reference run in the
input dtype, plus a floor: half an ulp of the dtype at the truth's scale, and
1e-6 of that scale for the float32 accumulation every implementation does
(it matters only for float32 inputs, where the reference error can be ~0).
"""
import jax
import jax.numpy as jnp
import numpy as np

from fa2_jax import attention_reference


def random_inputs(seed, *, batch, seq_q, seq_k, heads, kv_heads, head_dim,
                  dtype):
  """q [B,T,N,H], k, v [B,S,K,H], dout [B,T,N,H] ~ N(0, 1); dlse [B,N,T]."""
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (batch, seq_q, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq_k, kv_heads, head_dim), dtype)
  v = jax.random.normal(ks[2], (batch, seq_k, kv_heads, head_dim), dtype)
  dout = jax.random.normal(ks[3], q.shape, dtype)
  dlse = jax.random.normal(ks[4], (batch, heads, seq_q), jnp.float32)
  return q, k, v, dout, dlse


def value_and_grads(fn, primals, dout, dlse):
  """(out, lse) of `fn(*primals)` and its gradients for the cotangents
  (dout, dlse): (dq, dk, dv, then one per extra primal)."""
  (out, lse), vjp = jax.vjp(fn, *primals)
  return (out, lse), vjp((dout, dlse.astype(lse.dtype)))


def reference_fn(scale, diff_names=(), **mask_kwargs):
  """The reference at full matmul precision: XLA on GPUs would otherwise run
  float32 matmuls in TF32, which is not "the input dtype". Takes
  (q, k, v, *extras), the extras being the keyword arguments `diff_names`."""
  def fn(q, k, v, *extras):
    with jax.default_matmul_precision("highest"):
      return attention_reference(q, k, v, scale=scale, **mask_kwargs,
                                 **dict(zip(diff_names, extras)))
  return fn


def truth_and_lowp(primals, dout, dlse, *, scale, diff_names=(),
                   **mask_kwargs):
  """The reference in float64 (truth) and in the input dtype, as numpy."""
  with jax.enable_x64(True):
    up = [jnp.asarray(np.asarray(x, np.float64)) for x in (*primals, dout,
                                                           dlse)]
    truth = value_and_grads(reference_fn(scale, diff_names, **mask_kwargs),
                            up[:-2], *up[-2:])
    truth = jax.tree.map(lambda x: np.asarray(x, np.float64), truth)
  lowp = value_and_grads(reference_fn(scale, diff_names, **mask_kwargs),
                         primals, dout, dlse)
  return truth, to_numpy(lowp)


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32),
                                           np.float64), tree)


def max_err(x, y):
  return float(np.max(np.abs(x - y)))


def assert_fa_rule(name, kernel, lowp, truth, *, factor, dtype):
  """Asserts max|kernel - truth| <= factor * max|lowp - truth| + floor."""
  assert np.all(np.isfinite(kernel)), f"{name}: non-finite values"
  scale = max(1.0, float(np.max(np.abs(truth))))
  assert np.max(np.abs(truth)) > 1e-3, f"{name}: truth is ~0, the test is void"
  floor = (0.5 * float(jnp.finfo(dtype).eps) + 1e-6) * scale
  err, ref_err = max_err(kernel, truth), max_err(lowp, truth)
  assert err <= factor * ref_err + floor, (
      f"{name}: kernel error {err:.3g} > {factor} x reference error "
      f"{ref_err:.3g} + floor {floor:.3g}")


def assert_lse_close(kernel, truth):
  """LSE is float32 in every implementation: absolute error ~ f32 rounding."""
  finite = np.isfinite(truth)
  assert np.array_equal(finite, np.isfinite(kernel)), "lse: -inf rows differ"
  tol = 1e-5 * max(1.0, float(np.max(np.abs(truth[finite]))))
  assert max_err(kernel[finite], truth[finite]) <= tol
