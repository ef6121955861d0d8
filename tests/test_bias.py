"""Bias beyond the numerics of test_variants: jax.nn semantics, -inf entries,
and the dS kernel running only when the bias is differentiated."""
import jax
import jax.numpy as jnp
import numpy as np

import fa2_jax


def _inputs(seed=0, b=2, t=48, s=40, n=4, kv=2, h=32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
  k = jax.random.normal(ks[1], (b, s, kv, h), jnp.float32)
  v = jax.random.normal(ks[2], (b, s, kv, h), jnp.float32)
  bias = jax.random.normal(ks[3], (1, n, t, s), jnp.float32)
  return q, k, v, bias


def test_bias_matches_jax_nn(interpret):
  q, k, v, bias = _inputs()
  with jax.default_matmul_precision("highest"):
    want = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True,
                                        implementation="xla")
    want_grad = jax.grad(lambda b: jax.nn.dot_product_attention(
        q, k, v, bias=b, implementation="xla").sum())(bias)
  got = fa2_jax.flash_attention(q, k, v, bias=bias, is_causal=True,
                                implementation="triton", interpret=interpret)
  got_grad = jax.grad(lambda b: fa2_jax.flash_attention(
      q, k, v, bias=b, implementation="triton", interpret=interpret).sum())(
          bias)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  assert got_grad.shape == bias.shape
  np.testing.assert_allclose(got_grad, want_grad, atol=2e-5, rtol=2e-5)
  assert np.max(np.abs(np.asarray(want_grad))) > 1e-2


def test_minus_inf_bias_masks_and_empty_rows_are_zero(interpret):
  """-inf in the bias hides keys; a row hidden entirely outputs 0, lse -inf,
  with finite gradients (jax.nn would give NaN there)."""
  q, k, v, _ = _inputs(1)
  bias = jnp.zeros((48, 40)).at[:, ::3].set(-jnp.inf).at[5].set(-jnp.inf)
  kw = dict(implementation="triton", interpret=interpret)
  out, lse = fa2_jax.flash_attention(q, k, v, bias=bias, return_residual=True,
                                     **kw)
  mask = jnp.isfinite(bias)
  want = fa2_jax.flash_attention(q, k, v, mask=mask, **kw)
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
  assert np.all(np.asarray(out)[:, 5] == 0.0)
  assert np.all(np.isneginf(np.asarray(lse)[:, :, 5]))
  grads = jax.grad(lambda q, k, v: fa2_jax.flash_attention(
      q, k, v, bias=bias, **kw).sum(), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _kernel_names(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


def test_bias_gradient_kernel_runs_only_when_asked(interpret):
  q, k, v, bias = _inputs(2)
  loss = lambda q, b: fa2_jax.flash_attention(
      q, k, v, bias=b, implementation="triton", interpret=interpret).sum()
  only_q = _kernel_names(jax.grad(loss, argnums=0), q, bias)
  with_bias = _kernel_names(jax.grad(loss, argnums=(0, 1)), q, bias)
  assert "fa2_backward_dq" in only_q and "fa2_backward_dq" in with_bias
  assert "fa2_backward_ds" not in only_q
  assert "fa2_backward_ds" in with_bias
