"""Flax integration: flash_attention_fn as a drop-in attention_fn for nnx and
linen, and fa2_jax.nn.MultiHeadAttention (GQA, causal, packing, dropout)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import fa2_jax
import fa2_jax.nn

B, T, D, HEADS = 2, 37, 64, 4


def _x(seed=0, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)


def _kernel_fn(interpret):
  return functools.partial(fa2_jax.nn.flash_attention_fn,
                           implementation="triton", interpret=interpret)


def _padding_mask(x):
  """Flax's float [B, 1, T, T] mask: causal, keys past 30 (batch 0) and 37
  (batch 1) padded. (Query rows that see no key at all would differ on
  purpose: fa2-jax outputs 0 there, Flax the mean of V.)"""
  valid = (jnp.arange(T)[None, :] < jnp.asarray([[30], [37]])).astype(
      jnp.float32)
  return (nnx.make_attention_mask(jnp.ones_like(valid), valid)
          * nnx.make_causal_mask(valid))


def _assert_trees_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol, rtol=tol)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b)) > 1e-3


@pytest.mark.parametrize("masking", ["causal-mask", "padding-mask"])
def test_nnx_drop_in_matches_flax_default(masking, interpret):
  x = _x()
  mask = (nnx.make_causal_mask(x[..., 0]) if masking == "causal-mask"
          else _padding_mask(x))
  make = lambda fn: nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=D, decode=False, rngs=nnx.Rngs(0),
      **({} if fn is None else dict(attention_fn=fn)))
  ours, flax_default = make(_kernel_fn(interpret)), make(None)

  def loss(model):
    return jnp.sum(model(x, mask=mask, deterministic=True) ** 2)

  with jax.default_matmul_precision("highest"):
    want, want_grads = nnx.value_and_grad(loss)(flax_default)
    got, got_grads = nnx.value_and_grad(loss)(ours)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_trees_close(nnx.state(got_grads), nnx.state(want_grads), 2e-4)


def test_linen_drop_in_matches_flax_default(interpret):
  x = _x(1)
  mask = _padding_mask(x)
  make = lambda **kw: linen.MultiHeadDotProductAttention(num_heads=HEADS,
                                                         **kw)
  ours, flax_default = make(attention_fn=_kernel_fn(interpret)), make()
  params = flax_default.init(jax.random.key(0), x, x, mask=mask)

  def loss(module, params):
    return jnp.sum(module.apply(params, x, x, mask=mask) ** 2)

  with jax.default_matmul_precision("highest"):
    want, want_grads = jax.value_and_grad(functools.partial(
        loss, flax_default))(params)
    got, got_grads = jax.value_and_grad(functools.partial(loss, ours))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_trees_close(got_grads, want_grads, 2e-4)


def test_extra_batch_axes_and_gqa_in_attention_fn(interpret):
  ks = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(ks[0], (2, 3, 20, 4, 16))
  k = jax.random.normal(ks[1], (2, 3, 24, 2, 16))
  v = jax.random.normal(ks[2], (2, 3, 24, 2, 16))
  mask = jnp.tril(jnp.ones((20, 24), bool))[None, None, None]  # [1,1,1,T,S]
  got = _kernel_fn(interpret)(q, k, v, mask=mask)
  with jax.default_matmul_precision("highest"):
    want = nnx.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_attention_fn_dropout_and_errors(interpret):
  x = _x(3)
  q = x.reshape(B, T, HEADS, D // HEADS)
  fn = _kernel_fn(interpret)
  plain = fn(q, q, q)
  rng = jax.random.key(1)
  np.testing.assert_array_equal(
      fn(q, q, q, dropout_rate=0.5, dropout_rng=rng, deterministic=True), plain)
  dropped = fn(q, q, q, dropout_rate=0.5, dropout_rng=rng)
  assert not np.allclose(dropped, plain)
  with pytest.raises(ValueError, match="needs dropout_rng"):
    fn(q, q, q, dropout_rate=0.5)
  with pytest.raises(NotImplementedError, match="cannot sow attention"):
    fn(q, q, q, module=object())


def test_broadcast_dropout_shares_one_mask(interpret):
  """With broadcast_dropout, identical (batch, head) slices stay identical;
  without, they differ."""
  q = jnp.broadcast_to(_x(4)[:1, :, None, :16], (B, T, HEADS, 16))
  fn = functools.partial(_kernel_fn(interpret), q, q, q, dropout_rate=0.4,
                         dropout_rng=jax.random.key(7))
  shared = np.asarray(fn(broadcast_dropout=True))
  per_head = np.asarray(fn(broadcast_dropout=False))
  np.testing.assert_array_equal(shared[0, :, 0], shared[1, :, 3])
  assert not np.allclose(per_head[0, :, 0], per_head[1, :, 3])


def _manual(module, x, **kw):
  """The module's computation with the reference attention."""
  q, k, v = module.query(x), module.key(x), module.value(x)
  out, _ = fa2_jax.attention_reference(q, k, v, **kw)
  return module.out(out)


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_module_gqa_causal_matches_reference(kv_heads, interpret):
  x = _x(5)
  module = fa2_jax.nn.MultiHeadAttention(
      num_heads=HEADS, in_features=D, num_kv_heads=kv_heads, is_causal=True,
      implementation="triton", interpret=interpret, rngs=nnx.Rngs(0))
  assert module.key.kernel.shape == (D, kv_heads, D // HEADS)
  with jax.default_matmul_precision("highest"):
    want = _manual(module, x, is_causal=True)
    got = module(x)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)
    want_grads = nnx.grad(lambda m: jnp.sum(
        _manual(m, x, is_causal=True) ** 2))(module)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  _assert_trees_close(nnx.state(grads), nnx.state(want_grads), 2e-4)


def test_module_segments_and_dropout(interpret):
  x = _x(6)
  ids = jnp.asarray([[0] * 20 + [1] * 17, [0] * 37], jnp.int32)
  module = fa2_jax.nn.MultiHeadAttention(
      num_heads=HEADS, in_features=D, out_features=32, num_kv_heads=2,
      is_causal=True, dropout_rate=0.3, implementation="triton",
      interpret=interpret, rngs=nnx.Rngs(0, dropout=1))
  with jax.default_matmul_precision("highest"):  # also for the equality
    got = module(x, segment_ids=ids, deterministic=True)
    want = _manual(module, x, is_causal=True, q_segment_ids=ids)
    assert got.shape == (B, T, 32)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    a, b = module(x, segment_ids=ids), module(x, segment_ids=ids)
    assert not np.allclose(a, got) and not np.allclose(a, b)  # fresh masks
    module.eval()
    np.testing.assert_array_equal(module(x, segment_ids=ids), got)


def test_module_with_custom_attention_fn():
  """attention_fn runs the same layer on another attention; what only
  fa2-jax can do raises."""
  x = _x(9)
  fn = functools.partial(jax.nn.dot_product_attention, implementation="xla")
  layer = fa2_jax.nn.MultiHeadAttention(
      num_heads=HEADS, in_features=D, num_kv_heads=2, is_causal=True,
      attention_fn=fn, rngs=nnx.Rngs(0))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(layer(x), _manual(layer, x, is_causal=True),
                               atol=2e-5, rtol=2e-5)
  with pytest.raises(NotImplementedError, match="segment_ids need fa2-jax"):
    layer(x, segment_ids=jnp.zeros((B, T), jnp.int32))
  with pytest.raises(NotImplementedError, match="dropout_rate > 0 needs"):
    fa2_jax.nn.MultiHeadAttention(num_heads=HEADS, in_features=D,
                                  dropout_rate=0.1, attention_fn=fn,
                                  rngs=nnx.Rngs(0))


def test_module_bad_heads():
  with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple "
                     r"of num_kv_heads \(3\)"):
    fa2_jax.nn.MultiHeadAttention(num_heads=4, in_features=D, num_kv_heads=3,
                                  rngs=nnx.Rngs(0))


def test_linen_module_matches_nnx_module(interpret):
  """The linen twin computes what the nnx module does with the same weights."""
  x = _x(7)
  ids = jnp.asarray([[0] * 20 + [1] * 17, [0] * 37], jnp.int32)
  kw = dict(num_heads=HEADS, num_kv_heads=2, is_causal=True,
            implementation="triton", interpret=interpret)
  nnx_layer = fa2_jax.nn.MultiHeadAttention(in_features=D, rngs=nnx.Rngs(0),
                                            **kw)
  linen_layer = fa2_jax.nn.LinenMultiHeadAttention(**kw)
  params = linen_layer.init(jax.random.key(0), x)
  for name in ("query", "key", "value", "out"):
    params["params"][name]["kernel"] = getattr(nnx_layer, name).kernel[...]
  with jax.default_matmul_precision("highest"):
    got = linen_layer.apply(params, x, segment_ids=ids)
    want = nnx_layer(x, segment_ids=ids)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_linen_module_dropout(interpret):
  x = _x(8)
  layer = fa2_jax.nn.LinenMultiHeadAttention(
      num_heads=HEADS, dropout_rate=0.5, implementation="triton",
      interpret=interpret)
  params = layer.init(jax.random.key(0), x)
  plain = layer.apply(params, x)
  a = layer.apply(params, x, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  b = layer.apply(params, x, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, plain)
