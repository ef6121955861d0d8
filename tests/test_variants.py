"""Attention variants (alignment, windows, padding, packing, masks, bias,
soft cap, ALiBi, dropout) against the reference, with FA2's error rule, alone
and combined."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa2_jax
from tests.test_numerics import SMALL_TILES, check_against_reference


def packed_ids(batch, length, num_docs, seed):
  """[B, L] sorted segment ids: `num_docs` documents of random lengths."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(0, num_docs, size=(batch, length)), axis=1)
  return jnp.asarray(ids, jnp.int32)


def lengths(batch, length, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(1, length + 1, size=(batch,)), jnp.int32)


def random_mask(shape, seed, density=0.7):
  """Bool mask of `shape`; its first row of queries sees nothing."""
  keep = jax.random.bernoulli(jax.random.key(seed), density, shape)
  return keep.at[..., 0, :].set(False) if shape[-2] > 1 else keep


def random_bias(shape, seed):
  """float32 bias of `shape`, ~N(0, 1)."""
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def dropout(rate, seed):
  return dict(dropout_rate=rate, dropout_rng=jax.random.key(seed))


def alibi_slopes(heads):
  """ALiBi's geometric slopes 2^(-8 i / N), i = 1..N."""
  return jnp.asarray([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)],
                     jnp.float32)


CASES = {
    # name: (shape (B, T, S, N, K, H, causal), mask_fn(B, T, S) -> kwargs)
    "bottom_right-T<S": ((1, 50, 130, 2, 1, 64, True),
                         lambda b, t, s: dict(causal_alignment="bottom_right")),
    "bottom_right-T>S": ((1, 130, 50, 2, 2, 40, True),
                         lambda b, t, s: dict(causal_alignment="bottom_right")),
    "window-causal": ((1, 150, 150, 2, 1, 64, True),
                      lambda b, t, s: dict(local_window_size=(40, 0))),
    "window-2sided": ((2, 97, 120, 2, 2, 48, False),
                      lambda b, t, s: dict(local_window_size=(20, 9))),
    "window-int-bottom_right": ((1, 60, 140, 2, 1, 32, True),
                                lambda b, t, s: dict(
                                    local_window_size=17,
                                    causal_alignment="bottom_right")),
    "lengths": ((3, 90, 110, 2, 1, 64, False),
                lambda b, t, s: dict(query_seq_lengths=lengths(b, t, 1),
                                     key_value_seq_lengths=lengths(b, s, 2))),
    "lengths-causal": ((2, 100, 100, 4, 2, 64, True),
                       lambda b, t, s: dict(
                           key_value_seq_lengths=lengths(b, s, 3))),
    "packed-causal": ((2, 160, 160, 2, 1, 64, True),
                      lambda b, t, s: dict(q_segment_ids=packed_ids(b, t, 5, 4))),
    "segments-unsorted-cross": ((2, 70, 90, 2, 2, 32, False),
                                lambda b, t, s: dict(
                                    q_segment_ids=jax.random.randint(
                                        jax.random.key(5), (b, t), 0, 3),
                                    kv_segment_ids=jax.random.randint(
                                        jax.random.key(6), (b, s), 0, 3))),
    "soft_cap": ((1, 90, 120, 4, 2, 64, False),
                 lambda b, t, s: dict(logits_soft_cap=2.0)),
    "soft_cap-causal-window": ((1, 100, 100, 2, 1, 48, True),
                               lambda b, t, s: dict(logits_soft_cap=1.5,
                                                    local_window_size=(30, 0))),
    "alibi-causal-gqa": ((2, 110, 110, 4, 2, 64, True),
                         lambda b, t, s: dict(alibi_slopes=alibi_slopes(4))),
    "alibi-per-batch-bottom_right": ((2, 70, 130, 2, 1, 32, True),
                                     lambda b, t, s: dict(
                                         alibi_slopes=jnp.asarray(
                                             [[0.5, 0.125], [0.25, 0.0625]]),
                                         causal_alignment="bottom_right")),
    "mask-full-gqa": ((2, 75, 90, 4, 2, 32, False),
                      lambda b, t, s: dict(mask=random_mask((b, 4, t, s), 14))),
    "mask-key-padding-causal": ((2, 100, 100, 2, 1, 64, True),
                                lambda b, t, s: dict(
                                    mask=random_mask((b, 1, 1, s), 15, 0.8))),
    "mask-2d-window": ((1, 80, 110, 2, 2, 48, False),
                       lambda b, t, s: dict(mask=random_mask((t, s), 16),
                                            local_window_size=(30, 30))),
    "bias-full-gqa": ((2, 75, 90, 4, 2, 32, False),
                      lambda b, t, s: dict(bias=random_bias((b, 4, t, s), 20))),
    "bias-heads-causal": ((1, 100, 130, 4, 2, 64, True),
                          lambda b, t, s: dict(
                              bias=random_bias((1, 4, t, s), 21))),
    "bias-2d-soft_cap-window": ((2, 90, 90, 2, 1, 48, False),
                                lambda b, t, s: dict(
                                    bias=random_bias((t, s), 22),
                                    logits_soft_cap=2.0,
                                    local_window_size=(25, 10))),
    "bias-keys-lengths": ((2, 70, 110, 2, 2, 32, True),
                          lambda b, t, s: dict(
                              bias=random_bias((b, 1, 1, s), 23),
                              key_value_seq_lengths=lengths(b, s, 24),
                              causal_alignment="bottom_right")),
    "dropout": ((2, 90, 120, 2, 2, 64, False),
                lambda b, t, s: dropout(0.3, 25)),
    "dropout-causal-gqa": ((1, 130, 130, 4, 2, 48, True),
                           lambda b, t, s: dropout(0.1, 26)),
    "everything": ((2, 140, 140, 4, 2, 40, True),
                   lambda b, t, s: dict(
                       bias=random_bias((1, 4, t, s), 27),
                       **dropout(0.15, 28),
                       q_segment_ids=packed_ids(b, t, 3, 7),
                       query_seq_lengths=lengths(b, t, 8),
                       key_value_seq_lengths=lengths(b, s, 9),
                       local_window_size=(50, 0),
                       logits_soft_cap=3.0,
                       alibi_slopes=alibi_slopes(4),
                       mask=random_mask((b, 1, t, s), 17, 0.9),
                       causal_alignment="bottom_right")),
}


@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["default",
                                                           "small-tiles"])
@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_reference(name, tiles, interpret):
  shape, mask_fn = CASES[name]
  check_against_reference(shape, jnp.bfloat16, interpret, block_sizes=tiles,
                          mask_fn=mask_fn, seed=11)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32],
                         ids=["float16", "float32"])
def test_combined_variants_other_dtypes(dtype, interpret):
  shape, mask_fn = CASES["everything"]
  check_against_reference(shape, dtype, interpret, mask_fn=mask_fn, seed=12)


def test_fully_masked_rows_are_zero_with_finite_grads(interpret):
  """bottom_right with T > S: the first T - S rows see no key."""
  shape, mask_fn = CASES["bottom_right-T>S"]
  out, lse, grads = check_against_reference(shape, jnp.bfloat16, interpret,
                                            mask_fn=mask_fn, seed=13)
  t, s = shape[1], shape[2]
  assert np.all(out[:, : t - s - 1] == 0.0)  # position < 0: nothing visible
  assert np.all(np.isneginf(lse[:, :, : t - s - 1]))
  assert np.all(np.isfinite(lse[:, :, t - s:]))
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(grads[0][:, : t - s - 1] == 0.0)


def test_padded_query_rows_output_zero(interpret):
  b, t, n, h = 2, 40, 2, 32
  q = jax.random.normal(jax.random.key(0), (b, t, n, h), jnp.float32)
  q_len = jnp.asarray([13, 40], jnp.int32)
  out, lse = fa2_jax.flash_attention(
      q, q, q, query_seq_lengths=q_len, return_residual=True,
      implementation="triton", interpret=interpret)
  assert np.all(np.asarray(out)[0, 13:] == 0.0)
  assert np.all(np.isneginf(np.asarray(lse)[0, :, 13:]))
  assert np.all(np.asarray(out)[0, :13] != 0.0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(causal_alignment="bottom"), ValueError,
     r"causal_alignment must be one of \('top_left', 'bottom_right'\), "
     r"got 'bottom'"),
    (dict(local_window_size=(3,)), TypeError,
     r"local_window_size must be an int or a \(left, right\) pair"),
    (dict(local_window_size=(3, -1)), ValueError,
     "local_window_size right must be an int >= 0, got -1"),
    (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), ValueError,
     r"query_seq_lengths must have shape \(1,\), got \(3,\)"),
    (dict(key_value_seq_lengths=jnp.ones((1,), jnp.float32)), TypeError,
     "key_value_seq_lengths must have an integer dtype, got float32"),
    (dict(q_segment_ids=jnp.ones((1, 15), jnp.int32)), ValueError,
     r"q_segment_ids must have shape \(1, 16\), got \(1, 15\)"),
    (dict(q_segment_ids=jnp.ones((1, 16), jnp.int32)), ValueError,
     r"kv_segment_ids \[B, S\] is required when T != S \(T=16, S=24\)"),
    (dict(kv_segment_ids=jnp.ones((1, 24), jnp.int32)), ValueError,
     "kv_segment_ids was given without q_segment_ids"),
    (dict(mask=jnp.ones((1, 2, 16, 24), jnp.int32)), TypeError,
     r"mask must be bool \(True = attend\), got int32"),
    (dict(mask=jnp.ones((1, 3, 16, 24), bool)), ValueError,
     r"mask shape \(1, 3, 16, 24\) is not broadcastable to \[B, N, T, S\] = "
     r"\(1, 2, 16, 24\)"),
    (dict(alibi_slopes=jnp.ones((3,))), ValueError,
     r"alibi_slopes must have shape \(2,\) or \(1, 2\), got \(3,\)"),
    (dict(alibi_slopes=jnp.ones((2,), jnp.int32)), TypeError,
     "alibi_slopes must be floating, got int32"),
    (dict(logits_soft_cap=0.0), ValueError,
     "logits_soft_cap must be finite and > 0, got 0.0"),
    (dict(logits_soft_cap="30"), TypeError,
     "logits_soft_cap must be a Python float or None, got str"),
    (dict(bias=jnp.ones((1, 2, 16, 24), jnp.int32)), TypeError,
     r"bias must be floating \(it is added to the logits\), got int32"),
    (dict(bias=jnp.ones((16, 23))), ValueError,
     r"bias shape \(16, 23\) is not broadcastable to \[B, N, T, S\] = "
     r"\(1, 2, 16, 24\)"),
    (dict(bias=[[0.0]]), TypeError,
     r"bias must be a float array broadcastable to \[B, N, T, S\] = "
     r"\(1, 2, 16, 24\), got list"),
    (dict(dropout_rate=0.1), ValueError,
     "dropout_rate=0.1 needs dropout_rng, a JAX PRNG key; got None"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError,
     r"dropout_rate must be in \[0, 1\), got 1.0"),
    (dict(dropout_rate="0.1"), TypeError,
     "dropout_rate must be a Python float, got str"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0),
          broadcast_dropout="yes"), TypeError,
     "broadcast_dropout must be a bool, got 'yes'"),
    (dict(dropout_rate=0.1, dropout_rng=jnp.zeros((3,), jnp.uint32)),
     TypeError, r"dropout_rng must be one JAX PRNG key .* got uint32 \(3,\)"),
])
def test_bad_mask_arguments(kwargs, error, message):
  q = jnp.ones((1, 16, 2, 32), jnp.float32)
  k = jnp.ones((1, 24, 2, 32), jnp.float32)
  with pytest.raises(error, match=message):
    fa2_jax.flash_attention(q, k, k, implementation="xla", **kwargs)


def test_variants_match_jax_nn():
  """Lengths and windows mean what they mean in jax.nn.dot_product_attention.

  Rows that see no key differ on purpose: fa2-jax outputs 0, jax.nn's XLA
  path (which masks with finfo.min) the mean of V. With kv length 30 and a
  left window of 7, rows 37+ of batch 0 see nothing.
  """
  b, t, n, h = 2, 48, 2, 32
  ks = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.float32) for kk in ks)
  mask = jnp.ones((b, 1, t, t), bool).at[:, :, :, 5].set(False)
  kw = dict(key_value_seq_lengths=jnp.asarray([30, 48], jnp.int32),
            local_window_size=(7, 3), is_causal=True, mask=mask)
  with jax.default_matmul_precision("highest"):
    got = fa2_jax.flash_attention(q, k, v, implementation="xla", **kw)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
  np.testing.assert_allclose(got[0, :37], want[0, :37], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(got[0, 37:]) == 0.0)


def test_alibi_slopes_are_constants(interpret):
  """No gradient reaches the slopes, in the kernels and in the reference."""
  q = jax.random.normal(jax.random.key(2), (1, 20, 2, 16), jnp.float32)
  for kw in (dict(implementation="triton", interpret=interpret),
             dict(implementation="xla")):
    grad = jax.grad(lambda s: fa2_jax.flash_attention(
        q, q, q, alibi_slopes=s, is_causal=True, **kw).sum())(
            jnp.asarray([0.5, 0.25]))
    np.testing.assert_array_equal(grad, 0.0)
