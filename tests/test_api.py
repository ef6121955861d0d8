"""The public API: errors for bad input, dispatch, and JAX transformations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa2_jax
from fa2_jax import attention, rules, validation
from tests import numerics


def qkv(b=1, t=16, s=24, n=4, k=2, h=32, dtype=jnp.float32, seed=0):
  q, kk, v, dout, _ = numerics.random_inputs(
      seed, batch=b, seq_q=t, seq_k=s, heads=n, kv_heads=k, head_dim=h,
      dtype=dtype)
  return q, kk, v, dout


@pytest.mark.parametrize("q_shape,k_shape,v_shape,message", [
    ((16, 4, 32), (1, 24, 2, 32), (1, 24, 2, 32),
     r"query must have rank 4 \[B, T, N, H\], got shape \(16, 4, 32\)"),
    ((1, 16, 4, 32), (2, 24, 2, 32), (2, 24, 2, 32),
     r"key batch size must match query's 1"),
    ((1, 16, 4, 32), (1, 24, 2, 16), (1, 24, 2, 16),
     r"key head_dim must match query's 32"),
    ((1, 16, 4, 32), (1, 24, 2, 32), (1, 20, 2, 32),
     r"value shape must equal key shape \(1, 24, 2, 32\), got \(1, 20, 2, 32\)"),
    ((1, 16, 4, 32), (1, 24, 3, 32), (1, 24, 3, 32),
     r"query heads N=4 must be a multiple of key/value heads K=3"),
    ((1, 0, 4, 32), (1, 24, 2, 32), (1, 24, 2, 32),
     r"query length T must be >= 1, got 0"),
])
def test_bad_shapes_name_the_argument(q_shape, k_shape, v_shape, message):
  z = lambda s: jnp.ones(s, jnp.float32)
  with pytest.raises(ValueError, match=message):
    fa2_jax.flash_attention(z(q_shape), z(k_shape), z(v_shape),
                            implementation="xla")


def test_bad_dtypes():
  q, k, v, _ = qkv()
  with pytest.raises(ValueError, match="key dtype must match query dtype "
                     "float32, got bfloat16"):
    fa2_jax.flash_attention(q, k.astype(jnp.bfloat16), v, implementation="xla")
  with pytest.raises(TypeError, match="query must be float16, bfloat16, "
                     "float32 or float64, got int32"):
    fa2_jax.flash_attention(q.astype(jnp.int32), k.astype(jnp.int32),
                            v.astype(jnp.int32))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(scale="0.1"), TypeError, "scale must be a Python float or None"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool, got 1"),
    (dict(return_residual="yes"), TypeError,
     "return_residual must be a bool, got 'yes'"),
    (dict(implementation="triton", interpret=1), TypeError,
     "interpret must be a bool, got 1"),
    (dict(implementation="cuda"), ValueError,
     r"implementation must be None or one of \('triton', 'mosaic', 'xla'\), "
     r"got 'cuda'"),
    (dict(implementation="xla", interpret=True), ValueError,
     "interpret=True applies to the Pallas implementations"),
    (dict(block_sizes=dict(block_q=64)), TypeError,
     r"block_sizes must be a fa2_jax.BlockSizes \(triton\), a "
     r"fa2_jax.MosaicBlocks \(mosaic\) or None, got dict"),
    (dict(block_sizes=fa2_jax.MosaicBlocks(), implementation="triton"),
     ValueError, "block_sizes is a MosaicBlocks, tiles of the 'mosaic' "
     "kernels, but implementation='triton'"),
    (dict(implementation="mosaic", interpret=True), NotImplementedError,
     "implementation='mosaic' cannot run in interpret mode"),
])
def test_bad_arguments(kwargs, error, message):
  q, k, v, _ = qkv()
  with pytest.raises(error, match=message):
    fa2_jax.flash_attention(q, k, v, **kwargs)


def test_kernel_limits(interpret):
  q, k, v, _ = qkv(h=264)
  with pytest.raises(NotImplementedError, match="head_dim 264 is not "
                     "supported by the 'triton' kernels"):
    fa2_jax.flash_attention(q, k, v, implementation="triton",
                            interpret=interpret)


@pytest.mark.parametrize("field,value,message", [
    ("block_q", 48, r"BlockSizes.block_q must be one of \(16, 32, 64, 128, "
     r"256\), got 48"),
    ("block_k_dq", 8, "BlockSizes.block_k_dq must be one of"),
    ("num_warps", 3, r"BlockSizes.num_warps must be one of \(1, 2, 4, 8, 16\)"),
    ("num_stages_bwd", 0, r"BlockSizes.num_stages_bwd must be an int in "
     r"\[1, 8\], got 0"),
])
def test_block_sizes_validation(field, value, message):
  with pytest.raises(ValueError, match=message):
    fa2_jax.BlockSizes(**{field: value})
  hash(fa2_jax.BlockSizes())  # usable as a static argument


def test_default_implementation_on_cpu_is_xla():
  if jax.default_backend() == "gpu":
    pytest.skip("CPU dispatch only")
  q, k, v, _ = qkv()
  out = fa2_jax.flash_attention(q, k, v)
  want, _ = fa2_jax.attention_reference(q, k, v, scale=32 ** -0.5)
  np.testing.assert_array_equal(out, want)
  with pytest.raises(NotImplementedError, match="pass interpret=True"):
    fa2_jax.flash_attention(q, k, v, implementation="triton")


def test_matches_jax_nn_dot_product_attention():
  """The reference is a drop-in for jax.nn: same layout, scale, causal, GQA."""
  q, k, v, _ = qkv(t=24, s=24)
  for causal in (False, True):
    got = fa2_jax.flash_attention(q, k, v, is_causal=causal,
                                  implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _fwd_bwd(interpret, q, k, v, dout):
  f = functools.partial(fa2_jax.flash_attention, is_causal=True,
                        implementation="triton", interpret=interpret)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(dout))


def test_bitwise_deterministic(interpret):
  q, k, v, dout = qkv(t=67, s=67, n=4, k=1, dtype=jnp.bfloat16)
  run = jax.jit(functools.partial(_fwd_bwd, interpret))
  first = run(q, k, v, dout)
  second = run(q, k, v, dout)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_vmap(interpret):
  q, k, v, dout = qkv(b=1, t=33, s=40)
  stack = lambda x, y: jnp.stack([x, y])
  q2, k2, v2, d2 = qkv(b=1, t=33, s=40, seed=1)
  batched = jax.vmap(functools.partial(_fwd_bwd, interpret))(
      stack(q, q2), stack(k, k2), stack(v, v2), stack(dout, d2))
  for i, args in enumerate([(q, k, v, dout), (q2, k2, v2, d2)]):
    for got, want in zip(batched, _fwd_bwd(interpret, *args)):
      np.testing.assert_allclose(got[i], want, atol=1e-6, rtol=1e-6)


def test_vmap_with_dropout_and_unbatched_kv(interpret):
  # Per-head dropout streams hash the batch index, so a vmapped axis cannot
  # fold into the batch: the launch runs as a map instead, and each slice
  # must equal its own call (same key, same bits). k, v are not batched.
  q, k, v, dout = qkv(b=1, t=33, s=40)
  q2, _, _, d2 = qkv(b=1, t=33, s=40, seed=1)
  f = functools.partial(fa2_jax.flash_attention, is_causal=True,
                        dropout_rate=0.3, dropout_rng=jax.random.key(3),
                        implementation="triton", interpret=interpret)
  def fwd_bwd(q, k, v, dout):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(dout))
  batched = jax.vmap(fwd_bwd, in_axes=(0, None, None, 0))(
      jnp.stack([q, q2]), k, v, jnp.stack([dout, d2]))
  for i, args in enumerate([(q, k, v, dout), (q2, k, v, d2)]):
    for got, want in zip(batched, fwd_bwd(*args)):
      assert float(jnp.max(jnp.abs(want))) > 0.1
      np.testing.assert_allclose(got[i], want, atol=1e-6, rtol=1e-6)


def test_checkpoint_and_jit(interpret):
  q, k, v, dout = qkv(t=40, s=40)
  def loss(q, k, v):
    out = fa2_jax.flash_attention(q, k, v, implementation="triton",
                                  interpret=interpret)
    return jnp.sum(out * dout)
  want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)


def _fwd_bwd_temp_bytes(seq_len, interpret):
  spec = jax.ShapeDtypeStruct((1, seq_len, 1, 64), jnp.bfloat16)
  def loss(q, k, v):
    out = fa2_jax.flash_attention(q, k, v, is_causal=True,
                                  implementation="triton", interpret=interpret)
    return jnp.sum(out.astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_sequence(interpret):
  """fwd+bwd at T=S=8192 never holds a T x S array: temporaries stay far below
  one [T, S] float32 matrix (256 MiB) and grow ~2x, not 4x, from T=4096."""
  temp_4k = _fwd_bwd_temp_bytes(4096, interpret)
  temp_8k = _fwd_bwd_temp_bytes(8192, interpret)
  one_score_matrix = 8192 * 8192 * 4
  assert 0 < temp_8k < one_score_matrix / 8, (temp_8k, one_score_matrix)
  assert temp_8k < 2.5 * temp_4k, (temp_4k, temp_8k)


def test_narrow_windows_take_small_tiles():
  dense = fa2_jax.default_block_sizes(128, jnp.bfloat16)
  assert fa2_jax.default_block_sizes(128, jnp.bfloat16, key_span=None) == dense
  assert fa2_jax.default_block_sizes(128, jnp.bfloat16, key_span=8193) == dense
  band = fa2_jax.default_block_sizes(128, jnp.bfloat16, key_span=1025)
  assert (band.block_q, band.block_k, band.num_warps) == (64, 64, 4)
  assert (band.block_q_dkv, band.block_k_dq, band.num_stages_bwd) == (64, 64, 2)
  with pytest.raises(TypeError, match="key_span must be an int or None, "
                     "got float"):
    fa2_jax.default_block_sizes(128, jnp.bfloat16, key_span=1024.0)
  with pytest.raises(ValueError, match="key_span must be >= 0, got -1"):
    fa2_jax.default_block_sizes(128, jnp.bfloat16, key_span=-1)
  # head_dim 256 keeps its own (smaller) tiles.
  assert (fa2_jax.default_block_sizes(256, jnp.bfloat16, key_span=1025)
          == fa2_jax.default_block_sizes(256, jnp.bfloat16))


@pytest.mark.parametrize("field,value,message", [
    ("block_q", 48, "MosaicBlocks.block_q must be a positive multiple of 64, "
     "got 48"),
    ("block_k_dkv", 0, "MosaicBlocks.block_k_dkv must be a positive multiple"),
    ("block_k", 128.0, "MosaicBlocks.block_k must be a positive multiple"),
    ("block_k_dq", 96, "MosaicBlocks.block_k_dq must be a positive multiple "
     "of 64 or 32, got 96"),
    ("block_q_dkv", 16, "MosaicBlocks.block_q_dkv must be a positive "
     "multiple of 64 or 32, got 16"),
    ("block_k", 32, "MosaicBlocks.block_k must be a positive multiple of 64, "
     "got 32"),
    ("block_q", True, "MosaicBlocks.block_q must be a positive multiple"),
    ("stages", 5, r"MosaicBlocks.stages must be an int in \[2, 4\], got 5"),
    ("stages", 1, r"MosaicBlocks.stages must be an int in \[2, 4\], got 1"),
    ("forward_stages", 5,
     r"MosaicBlocks.forward_stages must be an int in \[2, 4\], got 5"),
    ("forward_stages", True,
     r"MosaicBlocks.forward_stages must be an int in \[2, 4\], got True"),
    ("fused_dq", 1, "MosaicBlocks.fused_dq must be a bool or None, got 1"),
    ("persistent", "yes",
     "MosaicBlocks.persistent must be a bool, got 'yes'"),
    ("overlap", None, "MosaicBlocks.overlap must be a bool, got None"),
    ("pingpong_across_tiles", 1,
     "MosaicBlocks.pingpong_across_tiles must be a bool, got 1"),
    ("consumers", 4, r"MosaicBlocks.consumers must be one of \(2, 3\), got 4"),
    ("consumers", True, "MosaicBlocks.consumers must be one of"),
    ("consumers", 3.0, "MosaicBlocks.consumers must be one of"),
])
def test_mosaic_blocks_validation(field, value, message):
  with pytest.raises(ValueError, match=message):
    fa2_jax.MosaicBlocks(**{field: value})
  hash(fa2_jax.MosaicBlocks())  # usable as a static argument
  assert fa2_jax.default_mosaic_blocks(256).block_k == 64
  # The backward's streamed blocks may be 32 (head_dim 256's default).
  assert fa2_jax.MosaicBlocks(block_k_dq=32, block_q_dkv=32).block_k_dq == 32


@pytest.mark.parametrize("seq_len,kwargs,block_k", [
    (8, dict(), 256),
    (8, dict(is_causal=True), 128),
    (4095, dict(is_causal=True), 128),
    (4096, dict(is_causal=True), 256),  # the diagonal is a small share
    (4096, dict(is_causal=True, local_window_size=(100, 0)), 128),
    (8, dict(local_window_size=(100, 100)), 128),
    (8, dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), 128),
])
def test_default_mosaic_key_tiles(seq_len, kwargs, block_k):
  """head_dim 64 takes 256-key forward tiles where no mask cuts many blocks;
  the dQ kernel keeps 128 keys (two [64, 256] float32 tiles would not fit
  its registers)."""
  x = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.float32)
  r = rules.build_rules(validation.check_qkv(x, x, x), **kwargs)
  config = attention.kernel_config(r.mask, r.score, r.dropout, "mosaic",
                                   False, 64, jnp.bfloat16)
  assert config.mosaic_blocks.block_k == block_k
  assert config.mosaic_blocks.block_k_dq == 128


@pytest.mark.parametrize("head_dim,kwargs,across", [
    (64, dict(is_causal=True), True),
    (128, dict(is_causal=True), False),
    (128, dict(), False),
    (128, dict(is_causal=True, local_window_size=(1024, 0)), True),
    (128, dict(local_window_size=(1024, 1024)), False),  # 2049 keys
    (128, dict(local_window_size=(1024, 1024), is_causal=True), True),
    (128, dict(local_window_size=(2047, 0)), True),  # 2048 keys
])
def test_default_pingpong_across_tiles(head_dim, kwargs, across):
  """The forward's ping-pong runs on across tiles at head_dim 64, and at
  128 where a window of at most 2048 keys keeps the tiles short."""
  x = jax.ShapeDtypeStruct((1, 4096, 2, head_dim), jnp.float32)
  r = rules.build_rules(validation.check_qkv(x, x, x), **kwargs)
  config = attention.kernel_config(r.mask, r.score, r.dropout, "mosaic",
                                   False, head_dim, jnp.bfloat16)
  assert config.mosaic_blocks.pingpong_across_tiles == across


@pytest.mark.parametrize("head_dim,kwargs,block_k_dq", [
    (128, dict(is_causal=True, local_window_size=(1024, 0)), 64),
    (128, dict(local_window_size=(1000, 1000)), 64),  # 2001 keys
    (128, dict(local_window_size=(1024, 1024)), 128),  # 2049 keys
    (128, dict(is_causal=True), 128),
    (128, dict(), 128),
    (64, dict(is_causal=True, local_window_size=(1024, 0)), 128),
])
def test_default_window_dq_blocks(head_dim, kwargs, block_k_dq):
  """The dQ kernel takes 64-key blocks at head_dim 128 under a window of at
  most 2048 keys."""
  x = jax.ShapeDtypeStruct((1, 4096, 2, head_dim), jnp.float32)
  r = rules.build_rules(validation.check_qkv(x, x, x), **kwargs)
  config = attention.kernel_config(r.mask, r.score, r.dropout, "mosaic",
                                   False, head_dim, jnp.bfloat16)
  assert config.mosaic_blocks.block_k_dq == block_k_dq


def _default_mosaic_tiles(head_dim, seq_q, seq_k, kwargs):
  """The MosaicBlocks fa2_jax picks for these shapes and mask arguments."""
  q = jax.ShapeDtypeStruct((1, seq_q, 2, head_dim), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, seq_k, 2, head_dim), jnp.float32)
  r = rules.build_rules(validation.check_qkv(q, kv, kv), **kwargs)
  return attention.kernel_config(r.mask, r.score, r.dropout, "mosaic",
                                 False, head_dim, jnp.bfloat16).mosaic_blocks


@pytest.mark.parametrize("head_dim,seq_q,seq_k,kwargs,consumers", [
    (64, 8192, 8192, dict(), 3),
    (32, 16384, 8192, dict(), 3),  # padded to 64
    (64, 4096, 4096, dict(), 2),
    (64, 1000, 16384, dict(), 2),  # short query tiles would waste rows
    (64, 8192, 8192, dict(is_causal=True), 2),
    (64, 8192, 8192, dict(local_window_size=(1024, 0)), 2),
    (64, 8192, 8192, dict(q_segment_ids=jnp.zeros((1, 8192), jnp.int32)), 2),
    (128, 16384, 16384, dict(), 2),
])
def test_default_consumers(head_dim, seq_q, seq_k, kwargs, consumers):
  """The forward takes 3 consumers over a 3-stage ring at head_dim 64 with
  no mask from 8192 queries and keys; the backward keeps 2 stages."""
  tiles = _default_mosaic_tiles(head_dim, seq_q, seq_k, kwargs)
  assert tiles.consumers == consumers
  assert tiles.stages == 2
  assert tiles.forward_stages == (3 if consumers == 3 else None)


@pytest.mark.parametrize("head_dim,seq_q,seq_k,kwargs,block_k", [
    (128, 8192, 8192, dict(), 192),
    (96, 16384, 16384, dict(), 192),  # padded to 128
    (128, 4096, 4096, dict(), 128),
    (128, 1000, 16384, dict(), 128),
    (128, 16384, 16384, dict(is_causal=True), 128),
    (128, 16384, 16384, dict(local_window_size=(1024, 0)), 128),
    (128, 8192, 8192, dict(q_segment_ids=jnp.zeros((1, 8192), jnp.int32)),
     128),
    (64, 8192, 8192, dict(), 128),
])
def test_default_wide_keys(head_dim, seq_q, seq_k, kwargs, block_k):
  """The forward takes 192-key blocks at head_dim 128 with no mask from
  8192 queries and keys (the backward's tiles are unchanged)."""
  tiles = _default_mosaic_tiles(head_dim, seq_q, seq_k, kwargs)
  assert tiles.block_k == block_k
  assert tiles.block_k_dkv == 64  # dQ: test_default_window_dq_blocks


@pytest.mark.parametrize("head_dim,seq_q,seq_k,kwargs,cluster", [
    (128, 4096, 4096, dict(), 2),
    (128, 2000, 1024, dict(), 2),  # 16 tiles, the last one part padding
    (64, 16384, 16384, dict(), 2),  # 86 tiles of 192 rows
    (64, 8192, 8192, dict(), 1),  # 43 tiles of 192 rows: no pairs
    (128, 1100, 4096, dict(), 1),  # 9 tiles: a pair would pad a 10th
    (128, 4096, 1000, dict(), 1),  # under CLUSTER_MIN_LEN keys
    (128, 512, 512, dict(), 1),
    (256, 4096, 4096, dict(), 1),
    (128, 4096, 4096, dict(is_causal=True), 1),
    (128, 4096, 4096, dict(local_window_size=(1024, 1024)), 1),
    (128, 4096, 4096, dict(q_segment_ids=jnp.zeros((1, 4096), jnp.int32)),
     1),
    (128, 4096, 4096, dict(key_value_seq_lengths=jnp.array([4000])), 1),
])
def test_default_cluster(head_dim, seq_q, seq_k, kwargs, cluster):
  """The forward runs in two-CTA clusters at head_dim <= 128 with no mask
  from 1024 queries and keys, where the query tiles pair up."""
  assert _default_mosaic_tiles(head_dim, seq_q, seq_k,
                               kwargs).cluster == cluster


def test_default_mosaic_blocks_validation():
  with pytest.raises(TypeError, match="masked must be a bool, got 1"):
    fa2_jax.default_mosaic_blocks(64, masked=1)
  with pytest.raises(TypeError, match="key_span must be an int or None"):
    fa2_jax.default_mosaic_blocks(128, key_span=1.5)
  with pytest.raises(ValueError, match="key_span must be >= 0, got -1"):
    fa2_jax.default_mosaic_blocks(128, key_span=-1)
  with pytest.raises(TypeError, match="unmasked_len must be an int or None"):
    fa2_jax.default_mosaic_blocks(64, unmasked_len=8192.0)
  with pytest.raises(ValueError, match="unmasked_len must be >= 0, got -1"):
    fa2_jax.default_mosaic_blocks(64, unmasked_len=-1)
  with pytest.raises(TypeError, match="seq_len_q must be an int or None"):
    fa2_jax.default_mosaic_blocks(64, seq_len_q="4096")
