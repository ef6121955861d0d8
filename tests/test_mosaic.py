"""The Hopper (Mosaic GPU) kernels: the shared numerics and variant cases
against the reference with FA2's error rule, bitwise repeatability, dispatch
and unsupported arguments.

Mosaic GPU kernels cannot be interpreted (wgmma, TMA): the numerics run only
with `--compiled` on a Hopper GPU; elsewhere the tests check the errors.
"""
import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa2_jax
from fa2_jax import backends
from pallas_kernels import (mosaic_backward, mosaic_forward, mosaic_tiles,
                            schedule)
from pallas_kernels.mask import MaskRule
from pallas_kernels.scores import ScoreRule
from tests import numerics, test_mask, test_schedule
from tests.test_numerics import SHAPES, check_against_reference
from tests.test_variants import CASES, lengths, packed_ids

# The variants the Hopper kernels carry (no bias, mask array, ALiBi, dropout).
MOSAIC_CASES = [
    "bottom_right-T<S", "bottom_right-T>S", "window-causal", "window-2sided",
    "window-int-bottom_right", "lengths", "lengths-causal", "packed-causal",
    "segments-unsorted-cross", "soft_cap", "soft_cap-causal-window"]
SMALL_MOSAIC_TILES = fa2_jax.MosaicBlocks(block_q=64, block_k=64,
                                          block_k_dq=64, block_q_dkv=64,
                                          block_k_dkv=64, stages=3)
# head_dim 64's forward tiles where no mask cuts blocks, here also under
# masks (explicit block_sizes may ask for them anywhere).
WIDE_KEY_TILES = fa2_jax.MosaicBlocks(block_k=256, block_q_dkv=128)


@pytest.fixture(scope="module")
def hopper(interpret):
  if interpret or not backends.is_hopper():
    pytest.skip("the mosaic kernels compile only for a Hopper GPU "
                "(run with --compiled on an H100/H200)")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, hopper):
  check_against_reference(shape, dtype, False, implementation="mosaic")


@pytest.mark.parametrize("shape", [
    pytest.param((2, 300, 260, 4, 2, 64, True), id="300x260-h64-gqa-causal"),
    pytest.param((1, 256, 256, 2, 2, 128, False), id="256-h128"),
    pytest.param((1, 200, 330, 2, 1, 128, True), id="200x330-h128-mqa"),
    pytest.param((1, 130, 150, 2, 2, 256, True), id="130x150-h256-causal"),
    pytest.param((1, 100, 100, 4, 4, 200, False), id="h200"),
])
def test_tile_geometry(shape, hopper):
  """Several CTAs and pipeline rounds, partial last tiles, head_dim 256."""
  check_against_reference(shape, jnp.bfloat16, False,
                          implementation="mosaic")


@pytest.mark.parametrize("name", MOSAIC_CASES)
def test_variant_matches_reference(name, hopper):
  shape, mask_fn = CASES[name]
  check_against_reference(shape, jnp.bfloat16, False, mask_fn=mask_fn,
                          seed=11, implementation="mosaic")


@pytest.mark.parametrize("name", ["window-2sided", "bottom_right-T<S",
                                  "packed-causal"])
def test_small_tiles(name, hopper):
  """64-key tiles, 3 stages: more blocks, ring slots reused more often."""
  shape, mask_fn = CASES[name]
  check_against_reference(shape, jnp.bfloat16, False,
                          block_sizes=SMALL_MOSAIC_TILES, mask_fn=mask_fn,
                          seed=11, implementation="mosaic")


@pytest.mark.parametrize("shape,mask_name", [
    ((1, 1000, 777, 4, 2, 64, False), None),
    ((2, 300, 260, 4, 2, 64, True), None),
    (None, "window-2sided"),
    (None, "packed-causal"),
    (None, "lengths-causal"),
    (None, "bottom_right-T>S"),
    (None, "soft_cap-causal-window"),
    ((1, 1500, 1500, 2, 1, 64, True), "window-300"),
])
def test_wide_key_tiles(shape, mask_name, hopper):
  """256-key forward tiles: partial last tiles, the diagonal, a band and
  segments cutting them; masked blocks run as 128-key sub-steps, skipping
  those no row sees and unmasked where every row sees them."""
  mask_fn = None
  if mask_name == "window-300":
    mask_fn = lambda b, t, s: dict(local_window_size=(300, 0))
  elif mask_name is not None:
    shape, mask_fn = CASES[mask_name]
    shape = (*shape[:5], 64, *shape[6:])
  check_against_reference(shape, jnp.bfloat16, False,
                          block_sizes=WIDE_KEY_TILES, mask_fn=mask_fn,
                          seed=15, implementation="mosaic")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
def test_default_wide_keys_match_reference(dtype, hopper):
  """The default at head_dim 128 without a mask from 8192 tokens: 192-key
  forward blocks, the last one read past S (8200 keys: 43 blocks, the last
  56 rows zero-filled by TMA)."""
  assert fa2_jax.default_mosaic_blocks(
      128, masked=False, unmasked_len=8200).block_k == 192
  check_against_reference((1, 8200, 8200, 2, 1, 128, False), dtype, False,
                          seed=27, implementation="mosaic")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("blocks", [dict(block_k=192), dict(forward_stages=3)],
                         ids=["keys192", "stages3"])
@pytest.mark.parametrize("shape,mask_name", [
    ((1, 1000, 777, 4, 2, 128, False), None),
    ((2, 300, 260, 4, 2, 128, True), None),
    ((1, 1500, 1500, 2, 1, 128, True), "window-300"),
    (None, "soft_cap-causal-window"),
    (None, "bottom_right-T>S"),
])
def test_head_dim_128_forward_rings(shape, mask_name, blocks, dtype, hopper):
  """The head_dim 128 forward with 192-key blocks or a 3-stage ring (what
  fits once no shared memory is held for reductions; not with segment ids):
  partial last blocks read past S, the diagonal and masks cutting a 192-key
  block whole."""
  mask_fn = None
  if mask_name == "window-300":
    mask_fn = _window(300)
  elif mask_name is not None:
    shape, mask_fn = CASES[mask_name]
    shape = (*shape[:5], 128, *shape[6:])
  check_against_reference(shape, dtype, False,
                          block_sizes=fa2_jax.MosaicBlocks(**blocks),
                          mask_fn=mask_fn, seed=26, implementation="mosaic")


# Three consumer warpgroups in the forward: 192-row query tiles, a ring of
# turns at the tensor cores (head_dim 64 only).
THREE_CONSUMERS = fa2_jax.MosaicBlocks(block_q_dkv=128, consumers=3,
                                       pingpong_across_tiles=True)


def _window(left, right=0):
  return lambda b, t, s: dict(local_window_size=(left, right))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape,mask_name", [
    ((2, 300, 260, 4, 2, 64, True), None),
    ((1, 1000, 777, 4, 2, 64, False), None),
    ((1, 100, 100, 4, 4, 40, False), None),  # head_dim padded to 64
    ((2, 300, 260, 4, 2, 128, True), None),  # 64-key blocks
    ((1, 1500, 1500, 2, 1, 128, True), "window-300"),
    ((1, 1500, 1500, 2, 1, 64, True), "window-300"),
    ((1, 1000, 1000, 2, 2, 64, False), "window-2sided-wide"),
    (None, "window-2sided"),
    (None, "packed-causal"),
    (None, "lengths-causal"),
    (None, "bottom_right-T>S"),
    (None, "soft_cap-causal-window"),
])
def test_three_consumers(shape, mask_name, dtype, hopper):
  """`MosaicBlocks.consumers=3`: query tiles of 192 rows (partial last
  tiles, bands and segments cutting them differently for each consumer)
  and the consumers' ring of turns."""
  mask_fn = None
  if mask_name == "window-300":
    mask_fn = _window(300)
  elif mask_name == "window-2sided-wide":
    mask_fn = _window(250, 130)
  elif mask_name is not None:
    shape, mask_fn = CASES[mask_name]
    shape = (*shape[:5], 64, *shape[6:])
  blocks = THREE_CONSUMERS
  if shape[5] > 64:  # 160 registers hold [64, 64] score tiles there
    blocks = dataclasses.replace(blocks, block_k=64, block_q_dkv=64)
  check_against_reference(shape, dtype, False, block_sizes=blocks,
                          mask_fn=mask_fn, seed=23, implementation="mosaic")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [
    (1, 8192, 8192, 2, 1, 64, False),  # the default there
    (2, 1000, 777, 4, 2, 64, False),
])
def test_three_consumers_three_stages(shape, dtype, hopper):
  """Three consumers over a 3-stage forward ring (`forward_stages`), the
  default at head_dim 64 without a mask from 8192 tokens; the backward
  keeps its 2 stages."""
  blocks = None
  if shape[1] < mosaic_tiles.THREE_CONSUMERS_MIN_LEN:
    blocks = dataclasses.replace(THREE_CONSUMERS, forward_stages=3)
  check_against_reference(shape, dtype, False, block_sizes=blocks, seed=25,
                          implementation="mosaic")


@pytest.mark.parametrize("name", ["bottom_right-T>S", "window-2sided",
                                  "packed-causal"])
def test_three_consumers_persistent(name, hopper, few_sms):
  """The ring of turns runs on across a CTA's tiles, empty ones included."""
  shape, mask_fn = CASES[name]
  shape = (*shape[:5], 64, *shape[6:])
  check_against_reference(shape, jnp.bfloat16, False,
                          block_sizes=THREE_CONSUMERS, mask_fn=mask_fn,
                          seed=24, implementation="mosaic")


def test_three_consumers_bitwise(hopper):
  """Each row takes the same steps in the same order as with two consumers
  (same 128-key blocks), so the forward is bitwise that of two; and it
  repeats."""
  q, k, v, _, _ = numerics.random_inputs(
      5, batch=2, seq_q=1000, seq_k=1000, heads=4, kv_heads=2, head_dim=64,
      dtype=jnp.bfloat16)
  def run(blocks, **kw):
    return jax.jit(functools.partial(
        fa2_jax.flash_attention, implementation="mosaic", block_sizes=blocks,
        return_residual=True, **kw))(q, k, v)
  for kw in (dict(is_causal=True), dict(local_window_size=(300, 0))):
    three = run(THREE_CONSUMERS, **kw)
    two = run(dataclasses.replace(THREE_CONSUMERS, consumers=2), **kw)
    for a, b, c in zip(three, run(THREE_CONSUMERS, **kw), two):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("blocks,head_dim,message", [
    (dict(consumers=3, block_k=256), 64,
     r"consumers=3 needs block_k <= 128 \(got 256\)"),
    (dict(consumers=3, overlap=True), 64, r"and overlap=False \(got True\)"),
    (dict(consumers=3), 128, "consumers=3 needs head_dim <= 64, or <= 128 "
     "with block_k=64 .*got head_dim 128 with block_k 128"),
    (dict(consumers=3, block_k=64), 256, "got head_dim 256 with block_k 64"),
])
def test_three_consumers_unsupported(blocks, head_dim, message):
  """Where 160 registers per consumer cannot hold the tiles."""
  q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
  rule = MaskRule(seq_len_q=256, seq_len_k=256, is_causal=True)
  with pytest.raises(NotImplementedError, match=message):
    tiles = fa2_jax.MosaicBlocks(**blocks)
    jax.eval_shape(functools.partial(
        mosaic_forward.forward, mask=rule,
        score=ScoreRule(scale=head_dim ** -0.5), blocks=tiles), q, q, q)


# Two-CTA clusters in the forward: K and V multicast to both query tiles of
# a pair (FlashAttention-3's non-causal forward at head_dim >= 128).
CLUSTER = fa2_jax.MosaicBlocks(cluster=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape,blocks", [
    ((1, 1000, 777, 4, 2, 128, False), CLUSTER),  # odd tile count: padded
    ((2, 300, 260, 4, 4, 128, False), dataclasses.replace(CLUSTER,
                                                          block_k=192)),
    ((1, 700, 700, 3, 1, 64, False), dataclasses.replace(
        CLUSTER, block_k=256, block_q_dkv=128)),
    ((1, 1000, 1000, 2, 2, 128, False), dataclasses.replace(
        CLUSTER, persistent=False)),
])
def test_cluster_forward(shape, blocks, dtype, hopper):
  """The clustered forward against the reference: T not a multiple of a
  pair of tiles, S not of a key block, GQA and MQA, one CTA per pair."""
  check_against_reference(shape, dtype, False, block_sizes=blocks, seed=31,
                          implementation="mosaic")


def test_cluster_forward_persistent(hopper, few_sms):
  """Persistent clusters (one per two of the 3 SMs faked here: a grid of
  1), each running many pairs with the K/V ring running on across them."""
  check_against_reference((2, 1000, 900, 4, 2, 128, False), jnp.bfloat16,
                          False, block_sizes=CLUSTER, seed=32,
                          implementation="mosaic")


def test_cluster_forward_bitwise(hopper):
  """Each row takes the same key blocks in the same order as without the
  cluster, so the forward is bitwise the unclustered one's; and it
  repeats."""
  q, k, v, _, _ = numerics.random_inputs(
      6, batch=2, seq_q=1000, seq_k=900, heads=4, kv_heads=2, head_dim=128,
      dtype=jnp.bfloat16)
  def run(blocks):
    return jax.jit(functools.partial(
        fa2_jax.flash_attention, implementation="mosaic", block_sizes=blocks,
        return_residual=True))(q, k, v)
  clustered = run(CLUSTER)
  for a, b, c in zip(clustered, run(CLUSTER),
                     run(dataclasses.replace(CLUSTER, cluster=1))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("rule_kwargs,message", [
    (dict(is_causal=True), "is_causal=True"),
    (dict(window_left=100, window_right=0), r"window=\(100, 0\)"),
    (dict(has_segments=True), "segment ids=True"),
])
def test_cluster_forward_unsupported(rule_kwargs, message):
  """Where the two tiles of a pair would visit different key blocks."""
  q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  rule = MaskRule(seq_len_q=1024, seq_len_k=1024, **rule_kwargs)
  segments = None
  if rule.has_segments:
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    segments = (ids, ids)
  with pytest.raises(NotImplementedError,
                     match=r"cluster=2\) needs .*" + message):
    jax.eval_shape(functools.partial(
        mosaic_forward.forward, mask=rule, score=ScoreRule(scale=0.1),
        blocks=CLUSTER), q, q, q, segments)


def test_cluster_must_be_one_or_two():
  with pytest.raises(ValueError, match="cluster must be 1 or 2, got 4"):
    fa2_jax.MosaicBlocks(cluster=4)


@pytest.mark.parametrize("pairs,heads,batch", [(16, 16, 4), (64, 16, 1),
                                               (3, 2, 1)])
def test_cluster_schedule_covers_every_pair(pairs, heads, batch,
                                            monkeypatch):
  """A clustered persistent grid has at most one cluster per two SMs, and
  its lists hold every (pair, head, batch) once."""
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 132)
  tiles = mosaic_tiles.Tiles.make([5] * pairs, heads, batch,
                                  persistent=True, cluster=2)
  total = pairs * heads * batch
  assert tiles.persistent == (total > 66)
  assert tiles.num_ctas == min(total, 66)
  # Walked as pairs (outside a kernel there is no "cluster" axis).
  walk = dataclasses.replace(tiles, cluster=1).bind(
      {"schedule": tiles.table() if tiles.persistent else None})
  seen = [tuple(int(x) for x in walk.at(jnp.int32(c), jnp.int32(t)))
          for c in range(walk.num_ctas)
          for t in range(int(walk.count(jnp.int32(c))))]
  assert sorted(seen) == sorted(itertools.product(
      range(pairs), range(heads), range(batch)))


def _mosaic_text(rule, blocks, head_dim, *, forward=True, backward=True,
                 given_delta=False):
  """The Hopper forward and/or backward at these tiles, traced and lowered
  for CUDA (on any host: Mosaic GPU's layout inference and shared-memory
  check run without a GPU). The backward takes O and computes delta, as
  under autodiff, or with `given_delta` takes delta (as ring attention)."""
  kw = dict(mask=rule, score=ScoreRule(scale=0.125), blocks=blocks)
  t, s = rule.seq_len_q, rule.seq_len_k
  q = jax.ShapeDtypeStruct((1, t, 4, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, s, 4, head_dim), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((1, 4, t), jnp.float32)
  segments = ((jax.ShapeDtypeStruct((1, t), jnp.int32),
               jax.ShapeDtypeStruct((1, s), jnp.int32))
              if rule.has_segments else None)

  def kernels(q, k, v, do, lse, delta, segments):
    out = ()
    if forward:
      out += mosaic_forward.forward(q, k, v, segments, **kw)
    if backward:
      if given_delta:
        out += mosaic_backward.backward(q, k, v, do, lse, delta, segments,
                                        **kw)
      else:  # O: any [B, T, N, H] array of the inputs' dtype
        out += mosaic_backward.backward(q, k, v, do, lse, None, segments,
                                        out=do, **kw)
    return out

  return jax.jit(kernels).trace(q, kv, kv, q, stats, stats, segments).lower(
      lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("head_dim,seq_len,rule_kwargs,blocks", [
    (64, 1000, dict(is_causal=True), None),
    (64, 4096, {}, None),  # 256-key forward tiles, the rotated fused dQ
    (64, 8192, dict(is_causal=True), None),  # the UP walk of the fused dQ
    (64, 8192, {}, None),  # 3 consumers, 3 forward stages
    (128, 8192, {}, None),  # 192-key forward blocks
    (128, 1000, dict(is_causal=True), None),
    (64, 2000, dict(is_causal=True, window_left=300, window_right=0), None),
    (64, 1000, dict(is_causal=True, has_segments=True), None),
    (128, 1000, dict(window_left=200, window_right=100, has_segments=True),
     None),
    (256, 1000, dict(is_causal=True), None),  # dK/dV in two launches
    (256, 700, dict(window_left=100, window_right=30, has_segments=True),
     None),
    (64, 2000, dict(is_causal=True, window_left=300, window_right=0),
     THREE_CONSUMERS),
    (64, 1000, dict(is_causal=True, has_segments=True), THREE_CONSUMERS),
    (128, 2000, dict(is_causal=True, window_left=300, window_right=0),
     dataclasses.replace(THREE_CONSUMERS, block_k=64, block_q_dkv=64)),
    (128, 4096, {}, CLUSTER),  # K/V multicast in two-CTA clusters
    (128, 1000, {}, dataclasses.replace(CLUSTER, block_k=192,
                                        persistent=False)),
])
def test_kernels_lower_for_cuda(head_dim, seq_len, rule_kwargs, blocks):
  """The forward and backward (at their default tiles, or `blocks`) trace
  and lower for CUDA on any host, a CPU too: their shape, layout and
  shared-memory errors show without a GPU (their numerics need one: the
  compiled tests)."""
  rule = MaskRule(seq_len_q=seq_len, seq_len_k=seq_len, **rule_kwargs)
  blocks = blocks or fa2_jax.default_mosaic_blocks(
      head_dim, masked=rule.cuts_many_blocks, key_span=rule.key_span,
      unmasked_len=rule.unmasked_len, seq_len_q=rule.seq_len_q)
  text = _mosaic_text(rule, blocks, head_dim)
  # The forward; the dK/dV kernel (twice at head_dim 256), and the dQ
  # kernel unless dQ is fused.
  assert text.count("stablehlo.custom_call @mosaic_gpu") >= (
      1 + len(mosaic_backward._launch_parts(head_dim)))


@pytest.mark.parametrize("head_dim,blocks,backward,message", [
    (128, dict(block_k=192, stages=3), False,
     r"MosaicBlocks\(consumers=2, block_q=64, block_k=192, stages=3\) needs "
     r"328824 bytes "
     r"of shared memory in the forward at head_dim 128, more than the 232448 "
     "a CTA can have"),
    (128, dict(stages=3), True,
     r"MosaicBlocks\(block_q=64, block_k_dq=128, stages=3\) needs 264304 "
     "bytes of shared memory in the dQ kernel at head_dim 128"),
    (64, dict(stages=3, fused_dq=True), True,
     r"MosaicBlocks\(block_q_dkv=128, block_k_dkv=64, stages=3\) needs "
     "233616 bytes of shared memory in the dK/dV kernel with dQ fused"),
    (64, dict(stages=4), False, "needs 279704 bytes of shared memory in the "
     "forward at head_dim 64"),
    (128, dict(forward_stages=4), False,
     r"MosaicBlocks\(consumers=2, block_q=64, block_k=128, forward_stages=4\) "
     "needs 296088 bytes"),
])
def test_tiles_past_shared_memory_raise(head_dim, blocks, backward, message,
                                        monkeypatch):
  """Tiles and rings that do not fit a CTA's shared memory raise a
  NotImplementedError naming the fields, with the bytes Mosaic GPU itself
  counts (its own error, once ours is switched off, says the same)."""
  tiles = dataclasses.replace(
      fa2_jax.default_mosaic_blocks(head_dim, masked=False), **blocks)
  lower = functools.partial(
      _mosaic_text, MaskRule(seq_len_q=4096, seq_len_k=4096), tiles,
      head_dim, forward=not backward, backward=backward, given_delta=True)
  with pytest.raises(NotImplementedError, match=message):
    lower()
  need = re.search(r"needs (\d+) bytes", message)
  monkeypatch.setattr(mosaic_tiles, "smem_limit", lambda: 10**9)
  with pytest.raises(ValueError, match=rf"exceeds available shared memory: "
                                       rf"smem_bytes={need.group(1)} "):
    lower()


@pytest.mark.parametrize("seq_k,block_k,pads", [
    (1000, 128, 0), (16384, 192, 0), (777, 128, 2), (100, 192, 2)])
def test_forward_reads_kv_unpadded(seq_k, block_k, pads):
  """The forward copies K and V into padded arrays only where S is not a
  multiple of 8 rows or shorter than a block: TMA zero-fills the rest of
  the last key block."""
  q = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq_k, 2, 128), jnp.bfloat16)
  rule = MaskRule(seq_len_q=1024, seq_len_k=seq_k)
  jaxpr = jax.make_jaxpr(functools.partial(
      mosaic_forward.forward, mask=rule, score=ScoreRule(scale=0.125),
      blocks=fa2_jax.MosaicBlocks(block_k=block_k)))(q, kv, kv)
  names = [str(e.params.get("name")) for e in jaxpr.eqns]
  assert sum("pad" in name for name in names) == pads, names


def test_forward_stages_leave_the_backward():
  """`forward_stages` deepens the forward's ring only: the backward traces
  to the same program as with `stages` alone; the forward to that of
  `stages=3`."""
  rule = MaskRule(seq_len_q=1000, seq_len_k=1000, is_causal=True)
  kw = dict(mask=rule, score=ScoreRule(scale=0.125))
  q = jax.ShapeDtypeStruct((1, 1000, 4, 64), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((1, 4, 1000), jnp.float32)

  def program(blocks, forward):
    if forward:
      return str(jax.make_jaxpr(lambda q, k, v: mosaic_forward.forward(
          q, k, v, None, blocks=blocks, **kw))(q, q, q))
    return str(jax.make_jaxpr(
        lambda q, k, v, do, lse, delta: mosaic_backward.backward(
            q, k, v, do, lse, delta, None, blocks=blocks, **kw))(
                q, q, q, q, stats, stats))

  base = fa2_jax.default_mosaic_blocks(64)
  deeper = dataclasses.replace(base, forward_stages=3)
  assert program(deeper, False) == program(base, False)
  assert program(deeper, True) != program(base, True)
  assert program(deeper, True) == program(
      dataclasses.replace(base, stages=3), True)


def test_default_fused_dq_only_where_it_fits():
  """With 3 stages the fused dK/dV kernel passes shared memory at head_dim
  64, so the default (fused_dq=None) runs the two kernels there."""
  fused = fa2_jax.default_mosaic_blocks(64, masked=False)
  assert fused.fused_dq is None
  lower = functools.partial(_mosaic_text, MaskRule(seq_len_q=4096,
                                                   seq_len_k=4096),
                            head_dim=64, forward=False)
  text = lower(fused)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1  # fused
  text = lower(dataclasses.replace(fused, stages=3))
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 2  # dK/dV, dQ


@pytest.mark.parametrize("head_dim,seq_len,rule_kwargs,in_kernel", [
    (64, 2048, dict(is_causal=True, window_left=256, window_right=0), True),
    (128, 1000, {}, True),  # O fits beside the ring with 944 bytes to spare
    (64, 4096, {}, False),  # dQ fused (the rotated walk): no dQ kernel
    (256, 1000, {}, False),  # no room for O
])
def test_dq_kernel_computes_delta_where_it_runs_and_o_fits(
    head_dim, seq_len, rule_kwargs, in_kernel):
  """Given O (as under autodiff), the backward computes delta = rowsum(dO O)
  in the dQ kernel, or, where that kernel does not run or O does not fit
  in its shared memory, in one XLA reduction before the kernels."""
  rule = MaskRule(seq_len_q=seq_len, seq_len_k=seq_len, **rule_kwargs)
  blocks = fa2_jax.default_mosaic_blocks(
      head_dim, masked=rule.cuts_many_blocks, key_span=rule.key_span,
      unmasked_len=rule.unmasked_len)
  q = jax.ShapeDtypeStruct((1, seq_len, 16, head_dim), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((1, 16, seq_len), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, do, lse: mosaic_backward.backward(
      q, q, q, do, lse, None, mask=rule, score=ScoreRule(scale=0.1),
      blocks=blocks, out=q))(q, q, stats)

  def outside_kernels(jaxpr):  # primitives, descending into jits only
    for e in jaxpr.eqns:
      yield e.primitive.name
      if e.primitive.name == "jit":
        yield from outside_kernels(e.params["jaxpr"].jaxpr)

  outer = set(outside_kernels(jaxpr.jaxpr))
  assert ("reduce_sum" not in outer) == in_kernel, outer
  with pytest.raises(ValueError, match="backward takes delta or out, exactly "
                                       "one of them; got delta=None, out=None"):
    jax.eval_shape(functools.partial(
        mosaic_backward.backward, mask=rule, score=ScoreRule(scale=0.1),
        blocks=blocks), q, q, q, q, stats, None)


def test_dq_scratch_with_o_counts_as_mosaic_does(monkeypatch):
  """O leaves 944 bytes of shared memory at head_dim 128, so its count must
  be Mosaic GPU's own: with a third stage (past the limit) and our limit
  switched off, Mosaic's error names exactly the bytes `mt.smem_bytes`
  gives for the dQ scratch with O."""
  rule = MaskRule(seq_len_q=4096, seq_len_k=4096)
  tiles = dataclasses.replace(
      fa2_jax.default_mosaic_blocks(128, masked=False), stages=3)
  need = mosaic_tiles.smem_bytes(mosaic_backward._dq_scratch(
      rule, mosaic_backward._dq_kernel_blocks(tiles), 128, jnp.bfloat16, 1,
      in_kernel=True))
  monkeypatch.setattr(mosaic_tiles, "smem_limit", lambda: 10**9)
  with pytest.raises(ValueError, match=rf"exceeds available shared memory: "
                                       rf"smem_bytes={need} "):
    _mosaic_text(rule, tiles, 128, forward=False)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_narrow_blocks_only_at_head_dim_256(head_dim):
  q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((1, 2, 256), jnp.float32)
  rule = MaskRule(seq_len_q=256, seq_len_k=256)
  with pytest.raises(NotImplementedError,
                     match=r"MosaicBlocks\(block_k_dq=32\): 32-row blocks "
                           f"run only at head_dim 256 \\(padded\\), got "
                           f"head_dim {head_dim}"):
    jax.eval_shape(functools.partial(
        mosaic_backward.backward, mask=rule, score=ScoreRule(scale=0.1),
        blocks=fa2_jax.MosaicBlocks(block_k_dq=32)), q, q, q, q, stats, stats)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape,mask_fn", [
    ((1, 1000, 777, 4, 2, 256, False), None),  # GQA, partial tiles
    ((2, 300, 260, 2, 1, 256, True), None),  # MQA, causal
    ((1, 700, 700, 2, 2, 192, True),  # padded to 256, a window
     lambda b, t, s: dict(local_window_size=(150, 40))),
    ((1, 600, 600, 2, 2, 256, True),  # packed documents, soft cap
     lambda b, t, s: dict(logits_soft_cap=20.0, q_segment_ids=jnp.broadcast_to(
         jnp.arange(t, dtype=jnp.int32) * 3 // t, (b, t)))),
])
def test_head_dim_256_backward(shape, mask_fn, dtype, hopper):
  """head_dim 256 on the Hopper backward: the dK/dV kernel's two launches
  (dV, then dK), 32-row query blocks and 32-key dQ blocks, 64-byte
  swizzle."""
  assert "dv" in mosaic_backward._parts(
      mosaic_backward._launch_parts(256)[0])
  check_against_reference(shape, dtype, False, mask_fn=mask_fn, seed=5,
                          implementation="mosaic")


@pytest.mark.parametrize("shape,window,alignment,blocks", [
    ((1, 1500, 1500, 2, 1, 128, True), (300, 0), "top_left", None),
    ((2, 1024, 1536, 2, 1, 64, True), (400, 0), "bottom_right", None),
    ((1, 1280, 1280, 2, 2, 128, False), (260, 100), "top_left", None),
    ((1, 1500, 1500, 2, 1, 64, True), (500, 0), "top_left", WIDE_KEY_TILES),
])
def test_one_sided_edge_masks(shape, window, alignment, blocks, hopper):
  """Windows wide enough that every kernel compares one bound in each masked
  run (`MaskRule.one_sided_runs`, asserted here so that the case cannot
  drift off that path): causal, bottom-right with T < S, two-sided without
  causal, and 256-key blocks run as sub-steps."""
  batch, t, s, _, _, head_dim, causal = shape
  tiles = blocks or fa2_jax.default_mosaic_blocks(head_dim)
  rule = MaskRule(seq_len_q=t, seq_len_k=s, is_causal=causal,
                  offset=s - t if alignment == "bottom_right" else 0,
                  window_left=window[0], window_right=window[1])
  query_tile = mosaic_tiles.CONSUMERS * tiles.block_q
  assert rule.one_sided_runs(query_tile, tiles.block_k, query_major=True)
  assert rule.one_sided_runs(query_tile, tiles.block_k_dq, query_major=True)
  assert rule.one_sided_runs(tiles.block_q_dkv,
                             mosaic_tiles.CONSUMERS * tiles.block_k_dkv,
                             query_major=False)
  mask_fn = lambda b, t, s: dict(local_window_size=window,
                                 causal_alignment=alignment)
  check_against_reference(shape, jnp.bfloat16, False, block_sizes=blocks,
                          mask_fn=mask_fn, seed=19, implementation="mosaic")


@pytest.mark.parametrize("shape,mask_name,block_k", [
    ((1, 1000, 777, 4, 2, 128, False), None, 128),
    ((2, 300, 260, 4, 2, 64, True), None, 128),
    ((1, 130, 150, 2, 2, 256, True), None, 64),
    ((1, 700, 700, 2, 1, 128, False), None, 64),  # many blocks per tile
    (None, "window-2sided", 128),
    (None, "packed-causal", 128),
    (None, "soft_cap-causal-window", 64),
    (None, "lengths-causal", 128),
    # The first 128-row tile sees no key.
    ((1, 300, 50, 2, 2, 64, True), "bottom_right-T>S", 64),
])
def test_overlapped_softmax(shape, mask_name, block_k, hopper):
  """Each consumer's softmax under its own matmuls (`overlap`): one block,
  several, masked edges, segments, rows and tiles that see no key."""
  mask_fn = None
  if mask_name is not None:
    case_shape, mask_fn = CASES[mask_name]
    shape = shape or case_shape
  blocks = dataclasses.replace(fa2_jax.default_mosaic_blocks(shape[5]),
                               block_k=block_k, overlap=True)
  check_against_reference(shape, jnp.bfloat16, False, block_sizes=blocks,
                          mask_fn=mask_fn, seed=17, implementation="mosaic")


@pytest.mark.parametrize("shape,kwargs,blocks", [
    ((1, 2000, 2000, 4, 2, 64, True), dict(docs=3), None),
    ((1, 1000, 1000, 2, 2, 128, True), dict(docs=3, window=(300, 0)), None),
    ((1, 900, 700, 2, 1, 128, False), dict(lengths=True), None),
    ((2, 1000, 1000, 2, 1, 64, True), dict(docs=4), SMALL_MOSAIC_TILES),
    ((1, 1000, 1000, 2, 2, 64, False), dict(docs=3),
     fa2_jax.MosaicBlocks(block_q_dkv=128, fused_dq=True)),
])
def test_whole_segment_blocks(shape, kwargs, blocks, hopper):
  """Long documents and padding: the blocks inside one document skip the
  element-wise mask (`mt.narrowed`'s middle run), the rest apply it."""
  def mask_fn(b, t, s):
    out = {}
    if "docs" in kwargs:
      out["q_segment_ids"] = packed_ids(b, t, kwargs["docs"], 13)
    if "window" in kwargs:
      out["local_window_size"] = kwargs["window"]
    if "lengths" in kwargs:
      out.update(query_seq_lengths=jnp.full((b,), t - 190, jnp.int32),
                 key_value_seq_lengths=jnp.full((b,), s - 150, jnp.int32))
    return out
  check_against_reference(shape, jnp.bfloat16, False, block_sizes=blocks,
                          mask_fn=mask_fn, seed=19, implementation="mosaic")


def test_combined_variants(hopper):
  """Packing, padding, window, soft cap, bottom-right, GQA at once."""
  def mask_fn(b, t, s):
    return dict(q_segment_ids=packed_ids(b, t, 3, 7),
                query_seq_lengths=lengths(b, t, 8),
                key_value_seq_lengths=lengths(b, s, 9),
                local_window_size=(50, 0), logits_soft_cap=3.0,
                causal_alignment="bottom_right")
  for dtype in (jnp.bfloat16, jnp.float16):
    check_against_reference((2, 140, 140, 4, 2, 40, True), dtype, False,
                            mask_fn=mask_fn, seed=12,
                            implementation="mosaic")


@pytest.mark.parametrize("tail_fraction", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("last_first", [True, False])
@pytest.mark.parametrize("grid", [(5, 3, 2, 7), (4, 2, 1, 3), (3, 1, 1, 3),
                                  (128, 16, 1, 132), (8, 16, 16, 132)])
def test_persistent_schedule(grid, last_first, tail_fraction, monkeypatch):
  """Every (tile, head, batch) runs exactly once, each CTA's tiles of a head
  heaviest first (causal: the last query tile, the first key tile), and
  the kernel's walk of the "schedule" table is the planned lists; a tail
  adds single-item CTAs after one per SM."""
  num_tiles, heads, batch, sms = grid
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: sms)
  monkeypatch.setattr(mosaic_tiles, "MAX_MEAN_COST_VARIED", 10**9)
  costs = [i + 1 if last_first else num_tiles - i for i in range(num_tiles)]
  tiles = mosaic_tiles.Tiles.make(costs, heads, batch, persistent=True,
                                  last_first=last_first,
                                  tail_fraction=tail_fraction)
  total = num_tiles * heads * batch
  assert tiles.persistent == (total > sms)
  if tiles.persistent:
    tail = min(int(tail_fraction * total), total - sms)
    assert tiles.num_ctas == sms + tail
    assert all(len(items) == 1 for items in tiles.lists[sms:])
  kernel_tiles = tiles.bind({"schedule": tiles.table()
                             if tiles.persistent else None})
  seen, work = [], []
  for cta in range(tiles.num_ctas):
    mine = [tuple(int(x) for x in kernel_tiles.at(jnp.int32(cta),
                                                  jnp.int32(t)))
            for t in range(int(kernel_tiles.count(jnp.int32(cta))))]
    for head_batch in set((h, b) for _, h, b in mine):
      mine_costs = [costs[i] for i, h, b in mine if (h, b) == head_batch]
      assert mine_costs == sorted(mine_costs, reverse=True)
    seen += mine
    work.append(sum(costs[i] for i, _, _ in mine))
  assert sorted(seen) == sorted(itertools.product(*map(range, grid[:3])))
  if tiles.persistent:
    item_costs = tiles.item_costs(costs)
    assert work == [sum(item_costs[i] for i in items) for items in tiles.lists]


@pytest.mark.parametrize("costs,heads,persistent", [
    ([1] * 8, 256, True),  # 1k
    ([9] * 128, 16, True),  # a band
    ([min(i + 1, 9) for i in range(128)], 16, True),  # a 1k window at 16k
    (list(range(1, 9)), 256, True),  # 1k causal
    (list(range(1, 33)), 64, True),  # 4k causal
    (list(range(1, 129)), 16, False),  # 16k causal: the hardware balances
    (list(range(1, 129)), 32, False),  # long tiles
    ([1] * 8, 16, False),  # fewer tiles than SMs
])
def test_persistent_when_balanced(costs, heads, persistent, monkeypatch):
  """Where persistent, the busiest CTA (tiles costed with their fixed part)
  is less than one tile past the mean, and no busier than in the snake
  order."""
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 132)
  tiles = mosaic_tiles.Tiles.make(costs, heads, 1, persistent=True)
  assert tiles.persistent == persistent
  if persistent:
    item_costs = [c + schedule.TILE_FIXED_COST
                  for c in tiles.item_costs(costs)]
    busiest = test_schedule.makespan(tiles.lists, item_costs)
    assert busiest < sum(item_costs) / 132 + max(item_costs)
    assert busiest <= test_schedule.makespan(
        schedule.snake(len(item_costs), 132), item_costs)


@pytest.mark.parametrize("seq_len,head_dim,persistent", [
    (16384, 64, True), (8192, 64, True), (8192, 128, True),
    (16384, 128, False),  # long tiles of varied length: the hardware's order
])
def test_causal_forward_persistent(seq_len, head_dim, persistent,
                                   monkeypatch):
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 132)
  tiles = mosaic_tiles.Tiles.make(
      [i + 1 for i in range(seq_len // 128)], 2048 // head_dim, 1,
      persistent=True,
      max_mean_varied=mosaic_forward._max_mean_varied(head_dim))
  assert tiles.persistent == persistent


@pytest.mark.parametrize("seq_len,window,head_dim,tail", [
    (16384, 1024, 64, mosaic_backward.DKDV_TAIL_FRACTION),  # 9 steps a tile
    (4096, None, 128, 0.0),  # no mask, 64 steps a tile: not measured
])
def test_dkdv_tail_only_for_short_tiles(seq_len, window, head_dim, tail):
  """The dK/dV launch's single-item tail (benchmarks/NOTES.md item 61) is
  taken only where key tiles are short, as where it was measured."""
  rule = MaskRule(seq_len_q=seq_len, seq_len_k=seq_len,
                  is_causal=window is not None, window_left=window)
  blocks = fa2_jax.default_mosaic_blocks(head_dim, masked=window is not None)
  num_k_tiles = seq_len // (mosaic_tiles.CONSUMERS * blocks.block_k_dkv)
  costs = mosaic_backward._key_tile_costs(rule, num_k_tiles, blocks, group=1)
  assert mosaic_backward._tail_fraction(costs) == tail


def test_key_tiles_heaviest_first():
  """The dK/dV kernel's tiles in ascending order are heaviest first under a
  causal mask (`Tiles(last_first=False)`), and its plan counts every step:
  a key tile of 128 keys meets each 64-row query block at or after it,
  for each of the group's 2 heads."""
  rule = MaskRule(seq_len_q=1024, seq_len_k=1024, is_causal=True)
  costs = mosaic_backward._key_tile_costs(
      rule, 8, mosaic_tiles.MosaicBlocks(), group=2)
  assert costs == [2 * (16 - 2 * i) for i in range(8)]


@pytest.mark.parametrize("rule,batch,heads,persistent", [
    (dict(seq_len_q=1024, seq_len_k=1024), 16, 32, True),  # 8 key blocks
    (dict(seq_len_q=1024, seq_len_k=1024, is_causal=True), 16, 16, True),
    (dict(seq_len_q=16384, seq_len_k=16384, is_causal=True,
          window_left=1024), 1, 32, True),
    (dict(seq_len_q=4096, seq_len_k=4096), 4, 16, False),  # 32 blocks
    (dict(seq_len_q=16384, seq_len_k=16384, is_causal=True), 1, 16, False),
])
def test_dq_kernel_persistent_where_tiles_are_short(rule, batch, heads,
                                                    persistent, monkeypatch):
  """The dQ kernel runs persistent only where its query tiles average at
  most 16 key blocks (`MAX_PERSISTENT_DQ_STEPS`): 1k tokens and windows."""
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 132)
  mask = MaskRule(**rule)
  for head_dim in (64, 128):
    blocks = fa2_jax.default_mosaic_blocks(head_dim)
    tiles = mosaic_backward._dq_tiles(mask, blocks,
                                      mask.seq_len_q // 128, heads, batch)
    assert tiles.persistent == persistent
    off = dataclasses.replace(blocks, persistent=False)
    assert not mosaic_backward._dq_tiles(mask, off, mask.seq_len_q // 128,
                                         heads, batch).persistent


@pytest.fixture
def few_sms(monkeypatch):
  """The persistent forward and dK/dV kernels on 3 CTAs, so that each runs
  several tiles."""
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 3)
  monkeypatch.setattr(mosaic_tiles, "MAX_MEAN_COST_VARIED", 10**9)
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.mark.parametrize("pingpong_across_tiles", [False, True])
@pytest.mark.parametrize("name", ["bottom_right-T>S", "window-2sided",
                                  "packed-causal", "lengths-causal",
                                  "soft_cap-causal-window"])
def test_persistent_variants(name, pingpong_across_tiles, hopper, few_sms):
  """Tiles with no key (query) block, bands, segments: the rings, the Q
  slots of the forward and the K/V slots of dK/dV run on across a CTA's
  tiles, and so does the consumers' ping-pong if asked."""
  shape, mask_fn = CASES[name]
  blocks = dataclasses.replace(fa2_jax.default_mosaic_blocks(shape[5]),
                               pingpong_across_tiles=pingpong_across_tiles)
  check_against_reference(shape, jnp.bfloat16, False, mask_fn=mask_fn,
                          block_sizes=blocks, seed=14,
                          implementation="mosaic")


@pytest.mark.parametrize("shape", [
    pytest.param((2, 300, 260, 4, 2, 64, True), id="300x260-h64-gqa-causal"),
    pytest.param((1, 1000, 777, 3, 1, 128, False), id="1000x777-h128-mqa"),
])
def test_persistent_geometry(shape, hopper, few_sms):
  for dtype in (jnp.bfloat16, jnp.float16):
    check_against_reference(shape, dtype, False, implementation="mosaic")


def fused_dq_tiles(head_dim):
  """The default tiles with dQ fused into the dK/dV kernel."""
  return dataclasses.replace(fa2_jax.default_mosaic_blocks(head_dim),
                             fused_dq=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_dq_matches_reference(shape, hopper):
  """Columns split (head_dim 128) and rows split (64, block_q_dkv 128)."""
  check_against_reference(shape, jnp.bfloat16, False,
                          block_sizes=fused_dq_tiles(shape[5]),
                          implementation="mosaic")


@pytest.mark.parametrize("name", ["window-2sided", "bottom_right-T>S",
                                  "packed-causal", "lengths-causal",
                                  "soft_cap-causal-window"])
def test_fused_dq_variants(name, hopper):
  """Query blocks that no key tile visits, bands, segments, soft cap."""
  shape, mask_fn = CASES[name]
  check_against_reference(shape, jnp.bfloat16, False, mask_fn=mask_fn,
                          block_sizes=fused_dq_tiles(shape[5]), seed=13,
                          implementation="mosaic")


def test_fused_dq_without_keys_in_first_blocks(hopper):
  """A fused dQ whose first query blocks see no key (bottom_right, T - S
  past a 128-row block): `_finish_dq` zeroes them with a row mask built
  while tracing, a constant the launch hoists out of custom_partitioning."""
  check_against_reference((1, 300, 50, 2, 2, 64, True), jnp.bfloat16, False,
                          mask_fn=lambda b, t, s: dict(
                              causal_alignment="bottom_right"),
                          block_sizes=fused_dq_tiles(64), seed=15,
                          implementation="mosaic")


@pytest.mark.parametrize("shape", [
    pytest.param((2, 700, 700, 4, 2, 64, False), id="700-h64-gqa"),
    pytest.param((1, 1024, 1024, 2, 1, 64, False), id="1024-h64-mqa"),
    pytest.param((1, 1000, 600, 4, 2, 64, False), id="1000x600-h64-gqa"),
    pytest.param((1, 512, 300, 2, 1, 128, False), id="512x300-h128-mqa"),
])
def test_fused_dq_rotated(shape, hopper):
  """No mask and at least as many query blocks as key tiles: the fused
  dQ's rotated walk, adding into two float32 sums, one of them empty in
  the blocks past the last key tile (`mosaic_backward._Walk`)."""
  check_against_reference(shape, jnp.bfloat16, False,
                          block_sizes=fused_dq_tiles(shape[5]),
                          implementation="mosaic")


@pytest.mark.parametrize("shape,mask_kwargs", [
    pytest.param((1, 2048, 2048, 4, 2, 64, True), {}, id="2048-h64-gqa"),
    pytest.param((2, 1500, 900, 2, 1, 64, True),
                 dict(causal_alignment="bottom_right"), id="1500x900-h64"),
    pytest.param((1, 1024, 1024, 2, 2, 128, True), {}, id="1024-h128"),
    pytest.param((1, 2048, 2048, 2, 2, 64, True),
                 dict(local_window_size=(500, 0)), id="2048-h64-window"),
])
def test_fused_dq_up_walk(shape, mask_kwargs, hopper):
  """Causal masks and a window: the fused dQ's UP walk, 8-16 key tiles
  adding into a query block, the last one first (`mosaic_backward._Walk`)."""
  check_against_reference(shape, jnp.bfloat16, False,
                          mask_fn=lambda b, t, s: mask_kwargs,
                          block_sizes=fused_dq_tiles(shape[5]), seed=17,
                          implementation="mosaic")


@pytest.mark.parametrize("num_q,num_k", [(1, 1), (2, 2), (5, 5), (8, 8),
                                         (5, 2), (8, 3)])
def test_rotated_walk_adds_one_step_apart(num_q, num_k):
  """Rotated, each key tile visits every query block once, and the tiles
  start at different blocks; in each dQ sum of a block the ranks run 0,
  1, ... in launch (tile) order, one step apart, so a tile waits only for
  the one launched before it; sum 1 is empty only in block 0 and sum 0
  only past the last key tile (`_finish_dq` drops them there)."""
  starts = {int(mosaic_backward._Walk(num_q, 0, num_q, k, mosaic_backward.ROTATED).block(0))
            for k in range(num_k)}
  assert len(starts) == num_k
  for q_block in range(num_q):
    order = {}
    for k_tile in range(num_k):
      walk = mosaic_backward._Walk(num_q, 0, num_q, k_tile,
                                   mosaic_backward.ROTATED)
      blocks = [int(walk.block(s)) for s in range(num_q)]
      assert sorted(blocks) == list(range(num_q))
      step = blocks.index(q_block)
      assert int(walk.step(2, q_block)) == 2 * num_q + step
      part, rank = map(int, walk.add_order(q_block))
      order[part, rank] = (k_tile, step)
    assert len(order) == num_k
    for part in (0, 1):
      ranks = sorted(r for p, r in order if p == part)
      assert ranks == list(range(len(ranks)))
      for r in ranks[1:]:
        (tile, step), (before, step_before) = order[part, r], order[part, r - 1]
        assert (before, step_before) == (tile - 1, step - 1)
    assert any(p == 1 for p, _ in order) == (q_block > 0)
    assert any(p == 0 for p, _ in order) == (q_block < num_k)


def test_walk_down_without_fused_dq():
  """The separate dQ kernel's walk: last query block first."""
  walk = mosaic_backward._Walk(4, 2, 6, 3, mosaic_backward.DOWN)
  assert [int(walk.block(s)) for s in range(4)] == [5, 4, 3, 2]
  assert int(walk.step(1, 4)) == 5


@pytest.mark.parametrize("rule,block_q", [
    (dict(seq_len_q=1024, seq_len_k=1024, is_causal=True), 128),
    (dict(seq_len_q=1024, seq_len_k=1024, is_causal=True), 64),
    (dict(seq_len_q=1000, seq_len_k=700, is_causal=True, offset=-300), 128),
    (dict(seq_len_q=1024, seq_len_k=1024, is_causal=True,
          window_left=300), 128),
    (dict(seq_len_q=900, seq_len_k=1100, window_left=200,
          window_right=130), 64),
    (dict(seq_len_q=500, seq_len_k=900), 128),  # every tile, every block
])
def test_up_walk_waits_only_on_tiles_launched_before(rule, block_q):
  """The fused dQ's UP walk under a band: the key tiles that visit a query
  block add into it from the last one down, each rank once, so a tile
  waits only for a higher tile, which launches before it
  (`Tiles(last_first=True)`) and, under a causal mask, reached the block
  one step (two with 64-row blocks) earlier: no deadlock, no wait."""
  mask = MaskRule(**rule)
  tile = 2 * 64
  num_k = -(-mask.seq_len_k // tile)
  num_q = -(-mask.seq_len_q // block_q)
  arrivals = {}  # query block -> {rank: (key tile, step)}
  for k_tile in range(num_k):
    start, _, _, end = mask.query_blocks(k_tile, block_q, tile)
    walk = mosaic_backward._Walk(max(end - start, 1), start, end, k_tile,
                                 mosaic_backward.UP)
    for s in range(end - start):
      q_block = int(walk.block(s))
      assert int(walk.step(1, q_block)) == (end - start) + s
      last = mask.key_blocks(q_block, block_q, tile)[3] - 1
      part, rank = walk.add_order(q_block, last)
      assert part == 0 and rank not in arrivals.setdefault(q_block, {})
      arrivals[q_block][rank] = (k_tile, s)
  assert arrivals
  for q_block, by_rank in arrivals.items():
    assert sorted(by_rank) == list(range(len(by_rank)))
    for rank in range(1, len(by_rank)):
      (tile_, step), (before, step_before) = by_rank[rank], by_rank[rank - 1]
      assert before == tile_ + 1
      if mask.is_causal and mask.window_left is None:
        assert step - step_before == tile // block_q


@pytest.mark.parametrize("causal,num_q,num_k,split,order", [
    (False, 8, 8, "rows", "rotated"),
    (True, 8, 8, "rows", "up"),  # key tiles see different query blocks
    (False, 16, 8, "cols", "rotated"),  # head_dim 128: 64-row query blocks
    (False, 4, 8, "rows", "up"),  # fewer query blocks than key tiles
    (False, 8, 8, None, "down"),  # the separate dQ kernel
])
def test_walk_order(causal, num_q, num_k, split, order):
  mask = MaskRule(seq_len_q=1024, seq_len_k=1024, is_causal=causal)
  assert mosaic_backward._walk_order(mask, split, num_q, num_k) == order


def _causal_costs(num_tiles, group=1):
  """The steps of a causal mask's key tiles, one query block per tile."""
  return [group * (num_tiles - j) for j in range(num_tiles)]


CAUSAL = dict(is_causal=True)


@pytest.mark.parametrize(
    "fused_dq,head_dim,rule,costs,copies,rotatable,split", [
    (None, 64, {}, [128] * 8, 32, False, "rows"),  # long key tiles
    (None, 64, {}, [64] * 8, 32, False, None),  # two persistent kernels
    (None, 64, {}, [16] * 8, 32, True, "rows"),  # the rotated walk, 2k on
    (None, 64, {}, [8] * 8, 32, True, None),  # 1k: two persistent kernels
    # Causal, the UP walk: 16k (tail 0.06) and 4k, not 2k (8.5 steps),
    # nor 16k with 4 query heads per kv head (tail 0.26), nor segments.
    (None, 64, CAUSAL, _causal_costs(128), 32, False, "rows"),
    (None, 64, CAUSAL, _causal_costs(32), 4 * 32, False, "rows"),
    (None, 64, CAUSAL, _causal_costs(16), 8 * 32, False, None),
    (None, 64, CAUSAL, _causal_costs(128, group=4), 8, False, None),
    (None, 64, dict(is_causal=True, has_segments=True), _causal_costs(128),
     32, False, None),
    (None, 128, CAUSAL, _causal_costs(256), 16, False, None),  # slower
    (None, 128, {}, [256] * 8, 16, True, None),  # head_dim 128: level
    (True, 128, CAUSAL, [8] * 8, 1, False, "cols"),
    (True, 64, {}, [8] * 8, 1, False, "rows"),
    (False, 64, {}, [128] * 8, 32, True, None),
    (True, 256, {}, [128] * 8, 32, True, None),  # dS and dQ: no room
])
def test_where_dq_is_fused(fused_dq, head_dim, rule, costs, copies,
                           rotatable, split, monkeypatch):
  monkeypatch.setattr(mosaic_tiles, "num_sms", lambda: 132)
  blocks = dataclasses.replace(fa2_jax.default_mosaic_blocks(head_dim),
                               fused_dq=fused_dq)
  mask = MaskRule(seq_len_q=1024, seq_len_k=1024, **rule)
  assert mosaic_backward._dq_split(blocks, head_dim, mask, costs, copies,
                                   rotatable) == split


@pytest.mark.parametrize("bounds,seg_range,narrowed", [
    ((0, 10, 10, 10), (2, 5, 0, 0), (2, 5, 5, 5)),
    ((3, 8, 8, 8), (1, 4, 0, 0), (3, 4, 4, 4)),
    ((3, 8, 8, 8), (9, 12, 9, 12), (9, 9, 9, 9)),  # nothing matches: empty
    ((0, 10, 10, 10), (0, 0, 0, 0), (0, 0, 0, 0)),
    # Position runs: unmasked where both runs say wholly visible.
    ((2, 4, 9, 10), (1, 8, 3, 7), (2, 4, 7, 8)),
    ((2, 4, 9, 10), (5, 10, 5, 6), (5, 5, 6, 10)),
    ((2, 4, 9, 10), (3, 9, 0, 0), (3, 4, 4, 9)),  # no whole segment match
])
def test_segment_ranges_narrow_tiles(bounds, seg_range, narrowed):
  """A tile visits the intersection of its position range and the blocks
  that can hold a matching segment pair, unmasked only where both say all
  pairs are visible; an empty one stays empty."""
  ranges = jnp.zeros((2, 3, 4), jnp.int32).at[1, 2].set(jnp.array(seg_range))
  got = mosaic_tiles.narrowed(bounds, ranges, 1, 2)
  assert [int(x) for x in got] == list(narrowed)
  assert mosaic_tiles.narrowed(bounds, None, 1, 2) == bounds


@pytest.mark.parametrize("query_major", [True, False])
def test_visited_runs_with_segments(query_major):
  """The kernels' runs under segment ids, against brute force: every block
  holding a visible pair is visited, every unmasked one is wholly visible,
  and each non-empty run is compiled (packed ids with padding, positions
  from random rules)."""
  rows, cols = (16, 8) if query_major else (8, 16)  # a tile, a block
  block_q, block_k = (rows, cols) if query_major else (cols, rows)
  unmasked = 0
  for n, rule in enumerate(test_mask.random_rules(60, seed=21)):
    rule = dataclasses.replace(rule, has_segments=True)
    t, s = rule.seq_len_q, rule.seq_len_k
    ids = [np.sort(np.random.default_rng(n).integers(0, 3, (2, length)))
           for length in (t, s)]
    ids[1][1, s // 2:] = -7  # lengths: keys past s // 2 match no query
    tp, sp = (mosaic_tiles.round_up(t, 16), mosaic_tiles.round_up(s, 16))
    padded = mosaic_tiles.pad_segments(
        tuple(jnp.asarray(x, jnp.int32) for x in ids), tp, sp)
    (ranges,) = mosaic_tiles.segment_ranges(padded, block_q, block_k,
                                            query_major=query_major)
    vis = np.zeros((2, tp, sp), bool)
    vis[:, :t, :s] = test_mask.visible_matrix(rule)
    vis &= np.asarray(padded[0])[:, :, None] == np.asarray(padded[1])[:, None]
    if not query_major:
      vis = vis.swapaxes(1, 2)  # [B, keys, queries]
    for b, tile in itertools.product(range(2), range(vis.shape[1] // rows)):
      bounds, loops = mosaic_tiles.visited_runs(
          rule, ranges, b, tile, block_q, block_k, query_major=query_major)
      start, full_start, full_end, end = (int(x) for x in bounds)
      assert start <= full_start <= full_end <= end
      for run, lo, hi in (("leading", start, full_start),
                          ("middle", full_start, full_end),
                          ("trailing", full_end, end)):
        assert loops[run] or lo == hi, (rule, tile, run)
      for block in range(vis.shape[2] // cols):
        pairs = vis[b, tile * rows:(tile + 1) * rows,
                    block * cols:(block + 1) * cols]
        if pairs.any():
          assert start <= block < end, (rule, b, tile, block)
        if full_start <= block < full_end:
          assert pairs.all(), (rule, b, tile, block)
          unmasked += 1
  assert unmasked > 50  # the runs do skip the mask


def test_segment_ranges_cover_every_match():
  """Per query tile, every key block holding a matching pair lies inside
  the range that the query-major kernels read (packed, unsorted ids)."""
  rng = np.random.default_rng(0)
  q_seg = np.sort(rng.integers(0, 5, (2, 512))).astype(np.int32)
  kv_seg = q_seg.copy()
  kv_seg[1] = rng.integers(0, 5, 512)  # unsorted: ranges over-approximate
  (key_range,) = mosaic_tiles.segment_ranges(
      (jnp.asarray(q_seg), jnp.asarray(kv_seg)), 128, 64, query_major=True)
  (query_range,) = mosaic_tiles.segment_ranges(
      (jnp.asarray(q_seg), jnp.asarray(kv_seg)), 128, 64, query_major=False)
  for b in range(2):
    for i in range(4):
      for j in range(8):
        meet = np.intersect1d(q_seg[b, i * 128:(i + 1) * 128],
                              kv_seg[b, j * 64:(j + 1) * 64]).size > 0
        if meet:
          assert key_range[b, i, 0] <= j < key_range[b, i, 1]
          assert query_range[b, j, 0] <= i < query_range[b, j, 1]
  assert (np.asarray(key_range[0, :, 1] - key_range[0, :, 0]) < 8).any()


def _fwd_bwd(q, k, v, dout, is_causal=True, **kwargs):
  out, vjp = jax.vjp(functools.partial(
      fa2_jax.flash_attention, is_causal=is_causal, implementation="mosaic",
      **kwargs), q, k, v)
  return (out, *vjp(dout))


@pytest.mark.parametrize("fused_dq,head_dim,is_causal", [
    (False, 128, True), (True, 128, True), (True, 64, True),
    (True, 64, False)])  # the rotated walk
def test_bitwise_repeatable(fused_dq, head_dim, is_causal, hopper):
  """Five key tiles add into each dQ block (fused): always in one order."""
  q, k, v, dout, _ = numerics.random_inputs(
      3, batch=2, seq_q=640, seq_k=640, heads=8, kv_heads=2,
      head_dim=head_dim, dtype=jnp.bfloat16)
  blocks = dataclasses.replace(fa2_jax.default_mosaic_blocks(head_dim),
                               fused_dq=fused_dq)
  run = jax.jit(functools.partial(_fwd_bwd, block_sizes=blocks,
                                  is_causal=is_causal))
  first = run(q, k, v, dout)
  for _ in range(3):
    for a, b in zip(first, run(q, k, v, dout)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _lowered(seq_len=2048, **kwargs):
  q = jnp.ones((1, seq_len, 2, 64), jnp.bfloat16)
  return jax.jit(lambda q: fa2_jax.flash_attention(q, q, q, **kwargs)).lower(
      q).as_text()


def test_default_picks_mosaic_where_faster(hopper):
  assert "mosaic_gpu" in _lowered(is_causal=True)
  assert "mosaic_gpu" in _lowered(block_sizes=fa2_jax.MosaicBlocks(),
                                  seq_len=128)
  assert "mosaic_gpu" in _lowered(seq_len=512)
  # Slower there (benchmarks/NOTES.md): short sequences.
  assert "mosaic_gpu" not in _lowered(seq_len=256)
  # Segment ids: the blocks of other documents are skipped (item 23).
  ids = jnp.zeros((1, 2048), jnp.int32)
  assert "mosaic_gpu" in _lowered(q_segment_ids=ids)
  assert "mosaic_gpu" in _lowered(key_value_seq_lengths=jnp.array([1500]))
  # Not carried by the Hopper kernels: the Triton ones run a bias.
  assert "mosaic_gpu" not in _lowered(bias=jnp.zeros((2048, 2048)))
  assert "mosaic_gpu" not in _lowered(block_sizes=fa2_jax.BlockSizes())


@pytest.mark.parametrize("kwargs,message", [
    (dict(bias=jnp.zeros((32, 32))), "does not support: bias"),
    (dict(mask=jnp.ones((32, 32), bool)), "does not support: mask"),
    (dict(alibi_slopes=jnp.ones((2,))), "does not support: alibi_slopes"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
     r"does not support: dropout_rate > 0"),
])
def test_unsupported_arguments_raise(kwargs, message, hopper):
  q = jnp.ones((1, 32, 2, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=message):
    fa2_jax.flash_attention(q, q, q, implementation="mosaic", **kwargs)


def test_float32_is_unsupported(hopper):
  q = jnp.ones((1, 32, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError,
                     match=r"does not support: dtype float32 \(float16 and "
                           r"bfloat16 only\)"):
    fa2_jax.flash_attention(q, q, q, implementation="mosaic")


def test_needs_a_hopper_gpu():
  if backends.is_hopper():
    pytest.skip("this machine has a Hopper GPU")
  q = jnp.ones((1, 32, 2, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError,
                     match=r"implementation='mosaic' needs a Hopper GPU "
                           r"\(compute capability 9.x\), found "):
    fa2_jax.flash_attention(q, q, q, implementation="mosaic")
