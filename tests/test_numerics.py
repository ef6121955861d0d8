"""Kernel outputs, LSE and gradients against the reference, FA2's error rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa2_jax
from tests import numerics

# (batch, T, S, N, K, H, is_causal): odd sizes on purpose.
SHAPES = [
    pytest.param((2, 113, 203, 4, 2, 59, False), id="113x203-h59-gqa"),
    pytest.param((1, 113, 203, 4, 2, 96, True), id="113x203-h96-gqa-causal"),
    pytest.param((1, 203, 113, 2, 2, 40, True), id="203x113-h40-causal-T>S"),
    pytest.param((1, 128, 256, 4, 1, 64, True), id="128x256-h64-mqa-causal"),
    pytest.param((2, 1, 77, 4, 4, 111, False), id="T1-h111"),
    pytest.param((1, 1, 77, 2, 1, 128, True), id="T1-h128-causal"),
]
DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]

# Small tiles: many blocks per sequence, block_q != block_k in both orders, so
# the masked / unmasked / skipped block ranges of every kernel are exercised.
SMALL_TILES = fa2_jax.BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=16,
    block_k_dq=32, num_warps=4, num_stages=2, num_warps_bwd=4,
    num_stages_bwd=2)


# Keyword arguments that are differentiated too when a test passes them.
DIFFERENTIABLE = ("bias",)


def kernel_fn(*, scale, interpret, block_sizes=None, diff_names=(),
              implementation="triton", **mask_kwargs):
  """The kernels as jitted fn(q, k, v, *extras) -> (out, lse); the extras are
  the keyword arguments `diff_names`."""
  return jax.jit(lambda q, k, v, *extras: fa2_jax.flash_attention(
      q, k, v, scale=scale, return_residual=True,
      implementation=implementation, interpret=interpret,
      block_sizes=block_sizes, **mask_kwargs,
      **dict(zip(diff_names, extras))))


def check_against_reference(shape, dtype, interpret, block_sizes=None, seed=0,
                            mask_fn=None, implementation="triton"):
  """Checks out, lse and grads; `mask_fn(batch, T, S)` returns mask kwargs.

  Those named in DIFFERENTIABLE (the bias) get their gradient checked too.
  Returns out, lse and the gradients (dq, dk, dv, then the extras').
  """
  batch, seq_q, seq_k, heads, kv_heads, head_dim, is_causal = shape
  q, k, v, dout, dlse = numerics.random_inputs(
      seed, batch=batch, seq_q=seq_q, seq_k=seq_k, heads=heads,
      kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
  scale = head_dim ** -0.5
  mask_kwargs = dict(is_causal=is_causal)
  if mask_fn is not None:
    mask_kwargs.update(mask_fn(batch, seq_q, seq_k))
  diff_names = tuple(n for n in DIFFERENTIABLE if n in mask_kwargs)
  extras = tuple(mask_kwargs.pop(n) for n in diff_names)
  primals = (q, k, v, *extras)
  fn = kernel_fn(scale=scale, interpret=interpret, block_sizes=block_sizes,
                 diff_names=diff_names, implementation=implementation,
                 **mask_kwargs)
  (out, lse), grads = numerics.value_and_grads(fn, primals, dout, dlse)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert out.shape == q.shape and lse.shape == (batch, heads, seq_q)
  assert [g.dtype for g in grads] == [x.dtype for x in primals]
  assert [g.shape for g in grads] == [x.shape for x in primals]
  truth, lowp = numerics.truth_and_lowp(primals, dout, dlse, scale=scale,
                                        diff_names=diff_names, **mask_kwargs)
  (out, lse), grads = numerics.to_numpy(((out, lse), grads))
  numerics.assert_fa_rule("out", out, lowp[0][0], truth[0][0], factor=2,
                          dtype=dtype)
  numerics.assert_lse_close(lse, truth[0][1])
  for name, g, g_lowp, g_truth in zip(("dq", "dk", "dv", *diff_names), grads,
                                      lowp[1], truth[1]):
    numerics.assert_fa_rule(name, g, g_lowp, g_truth, factor=3, dtype=dtype)
  return out, lse, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, interpret):
  check_against_reference(shape, dtype, interpret)


@pytest.mark.parametrize("shape", [
    pytest.param((2, 97, 131, 6, 2, 64, True), id="97x131-gqa-causal"),
    pytest.param((1, 131, 97, 3, 3, 48, True), id="131x97-causal"),
    pytest.param((1, 80, 80, 2, 1, 32, False), id="80x80-mqa"),
])
def test_small_tiles_match_reference(shape, interpret):
  check_against_reference(shape, jnp.bfloat16, interpret,
                          block_sizes=SMALL_TILES, seed=1)


@pytest.mark.parametrize("shape", [
    pytest.param((1, 70, 90, 2, 1, 256, True), id="h256-causal"),
    pytest.param((1, 33, 1, 2, 1, 8, True), id="S1-h8-causal"),
    pytest.param((1, 20, 45, 3, 1, 1, False), id="h1"),
])
def test_edge_shapes(shape, interpret):
  check_against_reference(shape, jnp.bfloat16, interpret, seed=2)


def test_gradients_without_residual_match_xla(interpret):
  """The usual path (no LSE returned) differentiates like the reference."""
  q, k, v, dout, _ = numerics.random_inputs(
      3, batch=1, seq_q=65, seq_k=65, heads=2, kv_heads=1, head_dim=32,
      dtype=jnp.float32)
  def loss(impl, **kw):
    return lambda q, k, v: jnp.sum(fa2_jax.flash_attention(
        q, k, v, is_causal=True, implementation=impl, **kw) * dout)
  got = jax.grad(loss("triton", interpret=interpret), argnums=(0, 1, 2))(
      q, k, v)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
