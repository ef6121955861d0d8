"""Dropout: the kernels drop exactly the reference's entries, repeatably, at
the asked rate; the LSE is that of the undropped softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa2_jax
from pallas_kernels import dropout as dropout_lib


def _kept(implementation, interpret, *, rate, seed, batch=2, heads=4,
          kv_heads=2, seq_q=75, seq_k=64, is_causal=False,
          broadcast=False):
  """The [B, N, T, S] keep mask a run actually applied.

  q = k = 0 makes P uniform (1 / S over visible keys) and V one-hot
  (v[j] = e_j, S = head_dim) makes out[b, i, n, j] = keep[b, n, i, j] /
  (S (1 - rate)) for visible keys: the mask can be read off the output.
  """
  q = jnp.zeros((batch, seq_q, heads, seq_k), jnp.float32)
  k = jnp.zeros((batch, seq_k, kv_heads, seq_k), jnp.float32)
  v = jnp.broadcast_to(jnp.eye(seq_k, dtype=jnp.float32)[None, :, None, :],
                       k.shape)
  kw = dict(interpret=interpret) if implementation == "triton" else {}
  out = fa2_jax.flash_attention(q, k, v, dropout_rate=rate,
                                dropout_rng=jax.random.key(seed),
                                is_causal=is_causal,
                                broadcast_dropout=broadcast,
                                implementation=implementation, **kw)
  return np.asarray(out).transpose(0, 2, 1, 3) > 0


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_kernel_drops_exactly_the_reference_entries(is_causal, interpret):
  rate, seed = 0.25, 7
  kernel = _kept("triton", interpret, rate=rate, seed=seed,
                 is_causal=is_causal)
  reference = _kept("xla", False, rate=rate, seed=seed, is_causal=is_causal)
  rule = dropout_lib.DropoutRule(rate=rate, num_heads=4)
  want = np.asarray(dropout_lib.keep_mask(
      rule, dropout_lib.seeds_from_key(jax.random.key(seed)), 2, 75, 64))
  if is_causal:
    want = want & np.tril(np.ones((75, 64), bool))
  np.testing.assert_array_equal(kernel, want)
  np.testing.assert_array_equal(reference, want)
  # heads and batches draw different masks
  assert not np.array_equal(want[0, 0], want[0, 1])
  assert not np.array_equal(want[0, 0], want[1, 0])


def test_broadcast_dropout_is_one_mask_in_kernel_and_reference(interpret):
  kernel = _kept("triton", interpret, rate=0.3, seed=2, broadcast=True)
  reference = _kept("xla", False, rate=0.3, seed=2, broadcast=True)
  rule = dropout_lib.DropoutRule(rate=0.3, num_heads=4, broadcast=True)
  want = np.asarray(dropout_lib.keep_mask(
      rule, dropout_lib.seeds_from_key(jax.random.key(2)), 2, 75, 64))
  np.testing.assert_array_equal(kernel, want)
  np.testing.assert_array_equal(reference, want)
  assert all(np.array_equal(want[0, 0], want[b, n])
             for b in range(2) for n in range(4))
  assert 0.6 < want.mean() < 0.8


def test_keep_fraction_matches_rate(interpret):
  """Within 1% of 1 - rate: the whole mask on a large grid, and what the
  kernel applied on a smaller one (which equals it, as tested above)."""
  for rate in (0.1, 0.5, 0.9):
    rule = dropout_lib.DropoutRule(rate=rate, num_heads=8)
    keep = dropout_lib.keep_mask(
        rule, dropout_lib.seeds_from_key(jax.random.key(3)), 4, 1024, 1024)
    assert abs(float(jnp.mean(keep)) - (1 - rate)) < 0.01 * (1 - rate)
  kept = _kept("triton", interpret, rate=0.4, seed=5, seq_q=256)
  assert abs(kept.mean() - 0.6) < 0.01


def test_same_key_is_bitwise_repeatable_and_keys_differ(interpret):
  q = jax.random.normal(jax.random.key(0), (1, 70, 2, 32), jnp.float32)
  run = lambda seed: jax.value_and_grad(
      lambda q: fa2_jax.flash_attention(
          q, q, q, dropout_rate=0.2, dropout_rng=jax.random.key(seed),
          is_causal=True, implementation="triton", interpret=interpret).sum())(q)
  (a, ga), (b, gb), (_, gc) = run(1), run(1), run(2)
  assert np.asarray(a) == np.asarray(b)
  np.testing.assert_array_equal(ga, gb)
  assert not np.array_equal(np.asarray(ga), np.asarray(gc))


def test_lse_is_the_undropped_softmax(interpret):
  q = jax.random.normal(jax.random.key(1), (2, 40, 2, 16), jnp.float32)
  kw = dict(return_residual=True, implementation="triton",
            interpret=interpret)
  out_d, lse_d = fa2_jax.flash_attention(
      q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0), **kw)
  out, lse = fa2_jax.flash_attention(q, q, q, **kw)
  np.testing.assert_allclose(lse_d, lse, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_d, out)


def test_raw_prngkey_works_like_typed_key(interpret):
  q = jax.random.normal(jax.random.key(1), (1, 33, 2, 16), jnp.float32)
  run = lambda rng: fa2_jax.flash_attention(
      q, q, q, dropout_rate=0.3, dropout_rng=rng, implementation="triton",
      interpret=interpret)
  np.testing.assert_array_equal(run(jax.random.PRNGKey(4)),
                                run(jax.random.wrap_key_data(
                                    jax.random.PRNGKey(4))))
