"""Tile helpers shared by the Triton-lowered kernels: masked loads and stores.

The Triton lowering turns refs into raw pointers and does not mask blocks that
run past an array's edge, so every load and store of a tile that may cross the
sequence end (rows) or the true head_dim (columns, padded to a power of two)
carries an explicit mask. In interpret mode Pallas pads such blocks with NaN,
so a missing mask shows up as NaN in the tests.

The query-major kernels (forward, dQ) also share their query tile's setup and
its per-block logits and visibility here (`query_tile`, `query_scores`,
`query_visibility`).
"""
import functools
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import mask as mask_lib


def _pow2_at_least_16(n: int) -> int:
  """The smallest power of two >= n, and at least 16 (Triton's dot minimum)."""
  return max(16, 1 << (n - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
  """The head_dim the kernels compute with: a power of two, at least 16."""
  return _pow2_at_least_16(head_dim)


def tile_block(block: int, seq_len: int) -> int:
  """A block size no larger than needed for `seq_len` (power of two, >= 16)."""
  return min(block, _pow2_at_least_16(seq_len))


def heavy_first(program, num_programs):
  """The query block a program along the grid's first axis works on.

  Under a causal mask the last query blocks see the most keys; launching them
  first (blocks are dispatched in grid order) shortens the tail of the launch.
  Used both in the kernels (on `pl.program_id(0)`) and in the BlockSpec index
  maps, so that the two agree.
  """
  return num_programs - 1 - program


class QueryMajorGrid(NamedTuple):
  """Launch geometry of the kernels parallel over query blocks (forward, dQ).

  grid: (query blocks, batch, query heads), query blocks heaviest first
  (`q_block` maps a grid index to its block). block_q, block_k: the tiles
  shrunk to the sequences. q_spec: a [block_q, Hp] tile of a [B, T, N, H]
  array; kv_spec: all of S of kv head h // group of [B, S, K, H];
  stats_spec: [block_q] of a [B, N, T] array.
  """
  grid: tuple
  block_q: int
  block_k: int
  seq_len_k_padded: int
  group: int
  q_block: Any
  q_spec: Any
  kv_spec: Any
  stats_spec: Any


def query_major_grid(q, k, block_q: int, block_k: int) -> QueryMajorGrid:
  """The `QueryMajorGrid` of q [B, T, N, H], k [B, S, K, H]."""
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  hp = padded_head_dim(head_dim)
  block_q = tile_block(block_q, seq_len_q)
  block_k = tile_block(block_k, seq_len_k)
  seq_len_k_padded = pl.cdiv(seq_len_k, block_k) * block_k
  num_q_blocks = pl.cdiv(seq_len_q, block_q)
  q_block = lambda i: heavy_first(i, num_q_blocks)
  return QueryMajorGrid(
      grid=(num_q_blocks, batch, num_heads), block_q=block_q,
      block_k=block_k, seq_len_k_padded=seq_len_k_padded, group=group,
      q_block=q_block,
      q_spec=pl.BlockSpec((None, block_q, None, hp),
                          lambda i, b, h: (b, q_block(i), h, 0)),
      kv_spec=pl.BlockSpec((None, seq_len_k_padded, None, hp),
                           lambda i, b, h: (b, 0, h // group, 0)),
      stats_spec=pl.BlockSpec((None, None, block_q),
                              lambda i, b, h: (b, h, q_block(i))))


def indices(start, size: int):
  """[size] int32: start, start+1, ..., start+size-1."""
  return start + lax.broadcasted_iota(jnp.int32, (size,), 0)


def tile_mask(rows, seq_len: int | None, head_dim: int, head_dim_padded: int):
  """[rows, head_dim_padded] bool for rows < seq_len and columns < head_dim.

  `seq_len=None` means every row is in bounds. Returns None when nothing
  needs masking, so that loads of full tiles carry no predicate.
  """
  mask = None
  if seq_len is not None:
    mask = (rows < seq_len)[:, None]
  if head_dim != head_dim_padded:
    cols = (lax.broadcasted_iota(jnp.int32, (head_dim_padded,), 0) < head_dim)
    mask = cols[None, :] if mask is None else jnp.logical_and(mask, cols[None, :])
  if mask is not None:
    mask = jnp.broadcast_to(mask, (rows.shape[0], head_dim_padded))
  return mask


def load_tile(ref, rows, seq_len, head_dim: int):
  """Loads a [len(rows), head_dim_padded] tile, zero outside the array."""
  mask = tile_mask(rows, seq_len, head_dim, ref.shape[-1])
  if mask is None:
    return plgpu.load(ref)
  return plgpu.load(ref, mask=mask, other=0.0)


def store_tile(ref, value, rows, seq_len, head_dim: int):
  """Stores a [len(rows), head_dim_padded] tile, skipping what is outside."""
  mask = tile_mask(rows, seq_len, head_dim, ref.shape[-1])
  plgpu.store(ref, value.astype(ref.dtype), mask=mask)


def load_row_stats(ref, rows, seq_len: int, other: float):
  """Loads a [len(rows)] float32 vector (lse or delta), `other` past seq_len."""
  return plgpu.load(ref, mask=rows < seq_len, other=other)


def dot_precision(dtype):
  """Full float32 matmuls for float32 inputs (no TF32); the default otherwise."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def visit_blocks(bounds, step, carry, *, leading: bool, middle: bool,
                 trailing: bool):
  """Runs `step(block, carry, masked=...)` over the block bounds of a MaskRule.

  `bounds` = (start, full_start, full_end, end): [start, full_start) and
  [full_end, end) masked, [full_start, full_end) unmasked. A loop its flag
  says is empty for this rule is not emitted at all. When both masked ranges
  can be non-empty (a window's two edges) they run as one loop, so that a
  program pays one software-pipeline fill for its masked blocks, not two.
  """
  start, full_start, full_end, end = bounds
  masked = functools.partial(step, masked=True)
  if leading and trailing:
    num_leading = full_start - start

    def either_edge(i, carry):
      block = jnp.where(i < num_leading, start + i,
                        full_end + (i - num_leading))
      return masked(block, carry)

    carry = lax.fori_loop(0, num_leading + (end - full_end), either_edge,
                          carry)
    leading = trailing = False
  if leading:
    carry = lax.fori_loop(start, full_start, masked, carry)
  if middle:
    carry = lax.fori_loop(full_start, full_end,
                          functools.partial(step, masked=False), carry)
  if trailing:
    carry = lax.fori_loop(full_end, end, masked, carry)
  return carry


class SegmentRefs(NamedTuple):
  """A kernel's segment refs: ids of its queries and keys, and the 0-d
  [first, end) block range from `mask.segment_block_ranges`."""
  q: Any
  kv: Any
  first: Any
  end: Any


class OptionalRefs(NamedTuple):
  """A kernel's optional input refs, each None when its feature is off.

  slope: ALiBi slope(s); bias: the bias array's block; mask_array: the mask
  array's block; seeds: the two 0-d dropout seed refs; segs: SegmentRefs.
  """
  slope: Any
  bias: Any
  mask_array: Any
  seeds: Any
  segs: Any


def split_optional_refs(refs, *, mask, score, dropout):
  """(OptionalRefs, the remaining refs), in the order `variant_inputs` feeds
  them: ALiBi slope, bias, mask array, 2 dropout seeds, 4 segment refs."""
  rest = list(refs)

  def take(on: bool, n: int):
    nonlocal rest
    if not on:
      return None
    group, rest = rest[:n], rest[n:]
    return group[0] if n == 1 else group

  slope = take(score.alibi, 1)
  bias = take(score.has_bias, 1)
  mask_array = take(mask.has_mask_array, 1)
  seeds = take(dropout.active, 2)
  segs = take(mask.has_segments, 4)
  segs = None if segs is None else SegmentRefs(*segs)
  return OptionalRefs(slope, bias, mask_array, seeds, segs), rest


def dropout_base(opt: OptionalRefs, dropout, batch, head):
  """The int32 dropout stream of (batch, query head), or None without dropout."""
  if opt.seeds is None:
    return None
  return dropout.head_base(opt.seeds[0][()], opt.seeds[1][()], batch, head)


def apply_dropout(x, dropout, base, rows, cols, *, keys_major: bool = False,
                  scale: bool = True):
  """x where the keep mask holds (times 1/(1-rate) if `scale`), else 0.

  `x` is a [rows, cols] tile ([cols, rows] if keys_major); no-op if base is
  None (no dropout).
  """
  if base is None:
    return x
  r, c = (rows[None, :], cols[:, None]) if keys_major else (rows[:, None],
                                                            cols[None, :])
  kept = x * dropout.keep_scale if scale else x
  return jnp.where(dropout.keep(base, r, c), kept, 0.0)


def clamp_to_segments(bounds, segs):
  """Narrows block bounds to the segments' [first, end); all blocks masked."""
  if segs is None:
    return bounds
  start, _, _, end = bounds
  start = jnp.maximum(start, segs.first[()])
  end = jnp.maximum(jnp.minimum(end, segs.end[()]), start)
  return start, end, end, end


def _load_ids(ref, at, idx, seq_len: int, pad: int):
  """[len(idx)] int32 ids of `ref.at[at]`, `pad` past seq_len."""
  ref = ref if at is None else ref.at[at]
  return plgpu.load(ref, mask=idx < seq_len, other=pad)


def load_query_segments(segs, rows, mask, at=None):
  """[len(rows)] int32 query ids (of `segs.q.at[at]`), or None."""
  if segs is None:
    return None
  return _load_ids(segs.q, at, rows, mask.seq_len_q,
                   mask_lib.PAD_QUERY_SEGMENT)


def load_key_segments(segs, cols, mask, at=None):
  """[len(cols)] int32 key ids (of `segs.kv.at[at]`), or None."""
  if segs is None:
    return None
  return _load_ids(segs.kv, at, cols, mask.seq_len_k, mask_lib.PAD_KEY_SEGMENT)


def tile_visibility(mask, rows, cols, q_seg=None, kv_seg=None, mask_tile=None,
                    *, keys_major: bool = False):
  """Visibility of a [len(rows), len(cols)] tile ([cols, rows] if keys_major).

  `q_seg`, `kv_seg`: the tile's segment ids (None without segments);
  `mask_tile`: its [rows, cols] mask-array tile (None without one).
  """
  if keys_major:
    r, c = rows[None, :], cols[:, None]
    segs = (None, None) if q_seg is None else (q_seg[None, :], kv_seg[:, None])
    mask_tile = None if mask_tile is None else mask_tile.T
  else:
    r, c = rows[:, None], cols[None, :]
    segs = (None, None) if q_seg is None else (q_seg[:, None], kv_seg[None, :])
  return mask.visible(r, c, *segs, mask_tile=mask_tile)


class QueryTile(NamedTuple):
  """What a query-major kernel (the forward, the dQ kernel) holds for its
  [block_q] query rows: `query_tile`."""
  block: Any  # the query block this program computes (heaviest first)
  rows: Any  # [block_q] row indices
  q: Any  # [block_q, Hp] the Q tile
  slope: Any  # the 0-d ALiBi slope, or None
  stream: Any  # the dropout stream's base, or None
  q_seg: Any  # [block_q] segment ids, or None
  precision: Any  # of every dot


def query_tile(q_ref, opt: OptionalRefs, *, mask, dropout,
               block_q: int, head_dim: int) -> QueryTile:
  """The query rows of this program (grid: query block, batch, head)."""
  block = heavy_first(pl.program_id(0), pl.num_programs(0))
  rows = indices(block * block_q, block_q)
  return QueryTile(
      block=block, rows=rows,
      q=load_tile(q_ref, rows, mask.seq_len_q, head_dim),
      slope=None if opt.slope is None else opt.slope[()],
      stream=dropout_base(opt, dropout, pl.program_id(1), pl.program_id(2)),
      q_seg=load_query_segments(opt.segs, rows, mask),
      precision=dot_precision(q_ref.dtype))


def query_scores(tile: QueryTile, k, cols, kv_rows, opt: OptionalRefs, *,
                 mask, score):
  """(base-2 logits [block_q, block_k], tanh term) of Q K^T for key block
  `kv_rows` (indices `cols`), with ALiBi and the bias (`ScoreRule.
  logits_log2`)."""
  alibi = None if tile.slope is None else score.alibi_bias(
      tile.slope, tile.rows[:, None], cols[None, :])
  bias = load_bias_tile(opt.bias, tile.rows, cols, mask, k_at=kv_rows)
  return score.logits_log2(
      plgpu.dot(tile.q, k, trans_b=True, precision=tile.precision), alibi,
      bias)


def query_visibility(tile: QueryTile, cols, kv_rows, opt: OptionalRefs, *,
                     mask):
  """[block_q, block_k] bool: which (query, key) pairs of a masked block
  are visible (segments and the mask array included)."""
  kv_seg = load_key_segments(opt.segs, cols, mask, at=kv_rows)
  mask_tile = load_pair_tile(opt.mask_array, tile.rows, cols, mask,
                             other=False, k_at=kv_rows)
  return tile_visibility(mask, tile.rows, cols, tile.q_seg, kv_seg,
                         mask_tile)


def segment_inputs(segments, *, block_q: int, block_k: int, seq_len_q: int,
                   seq_len_k: int, query_major: bool, q_block=lambda i: i):
  """BlockSpecs and arrays that feed `SegmentRefs` to a kernel.

  query_major: grid (query blocks, batch, heads), the program's query ids and
  all key ids (forward, dQ); else grid (key blocks, batch, kv heads), all query
  ids and the program's key ids (dK/dV). `q_block` maps the grid index to the
  query block (see `heavy_first`).
  """
  q_seg, kv_seg = segments
  key_range, query_range = mask_lib.segment_block_ranges(q_seg, kv_seg,
                                                         block_q, block_k)
  if query_major:
    seq_len_k_padded = pl.cdiv(seq_len_k, block_k) * block_k
    ranges = key_range
    specs = [pl.BlockSpec((None, block_q), lambda i, b, h: (b, q_block(i))),
             pl.BlockSpec((None, seq_len_k_padded), lambda i, b, h: (b, 0))]
    own_block = q_block
  else:
    seq_len_q_padded = pl.cdiv(seq_len_q, block_q) * block_q
    ranges = query_range
    specs = [pl.BlockSpec((None, seq_len_q_padded), lambda j, b, h: (b, 0)),
             pl.BlockSpec((None, block_k), lambda j, b, h: (b, j))]
    own_block = lambda j: j
  range_spec = pl.BlockSpec((None, None), lambda i, b, h: (b, own_block(i)))
  return (specs + [range_spec, range_spec],
          [q_seg, kv_seg, ranges[..., 0], ranges[..., 1]])


def load_pair_tile(ref, rows, cols, mask, *, other, q_at=None, k_at=None,
                   head=None, keys_major: bool = False):
  """The [rows, cols] tile of a mask or bias array (size-1 axes broadcast).

  `ref` is a [T_blk, S_blk] block (or [group, T_blk, S_blk] in dK/dV, picked
  by `head`), or None (then None is returned); a size-1 axis is a broadcast
  one. `q_at` / `k_at` slice the query / key axis when the block spans more
  than one tile; entries past T or S read `other`. keys_major: the tile comes
  back transposed, [cols, rows].
  """
  if ref is None:
    return None
  bcast_q, bcast_k = ref.shape[-2] == 1, ref.shape[-1] == 1
  # One indexer: the Triton lowering cannot stack `.at[...]` views.
  tile = (slice(None) if bcast_q or q_at is None else q_at,
          slice(None) if bcast_k or k_at is None else k_at)
  ref = ref.at[(head, *tile) if ref.ndim == 3 else tile]
  ok_q = jnp.full((1,), True) if bcast_q else rows < mask.seq_len_q
  ok_k = jnp.full((1,), True) if bcast_k else cols < mask.seq_len_k
  x = plgpu.load(ref, mask=jnp.logical_and(ok_q[:, None], ok_k[None, :]),
                 other=other)
  return x.T if keys_major else x


def load_bias_tile(ref, rows, cols, mask, **kwargs):
  """The float32 bias tile (see `load_pair_tile`), or None without a bias."""
  x = load_pair_tile(ref, rows, cols, mask, other=0.0, **kwargs)
  return None if x is None else x.astype(jnp.float32)


def pair_array_spec(array, *, block_q: int, block_k: int, seq_len_q: int,
                    seq_len_k: int, group: int, query_major: bool,
                    q_block=lambda i: i):
  """BlockSpec feeding a mask or bias array's ref to a kernel.

  `array` is [Bm, Nm, Tm, Sm], each axis full or 1 (broadcast).
  query_major (forward, dQ): a [block_q, S_pad] slab per program; else
  (dK/dV): [group, T_pad, block_k] (the heads of the kv head's group).
  """
  bm, nm, tm, sm = array.shape
  pick = lambda full, idx: idx if full > 1 else 0
  if query_major:
    t_blk = block_q if tm > 1 else 1
    s_blk = pl.cdiv(seq_len_k, block_k) * block_k if sm > 1 else 1
    spec = pl.BlockSpec((None, None, t_blk, s_blk), lambda i, b, h: (
        pick(bm, b), pick(nm, h), pick(tm, q_block(i)), 0))
  else:
    t_blk = pl.cdiv(seq_len_q, block_q) * block_q if tm > 1 else 1
    s_blk = block_k if sm > 1 else 1
    n_blk = group if nm > 1 else None
    spec = pl.BlockSpec((None, n_blk, t_blk, s_blk), lambda j, b, h: (
        pick(bm, b), pick(nm, h), 0, pick(sm, j)))
  return spec


def variant_inputs(*, mask, score, dropout, segments, alibi_slopes, bias,
                   mask_array, seeds, block_q: int, block_k: int,
                   seq_len_q: int, seq_len_k: int, group: int,
                   query_major: bool, q_block=lambda i: i):
  """BlockSpecs and arrays of a kernel's optional refs, in the order
  `split_optional_refs` takes them: ALiBi slope, bias, mask array, dropout
  seeds, segment refs.

  query_major: grid (query blocks, batch, heads) (forward, dQ); else
  (key blocks, batch, kv heads) (dK/dV), where a program serves the `group`
  query heads of its kv head. `seeds` is [2] int32.
  """
  specs, arrays = [], []
  if score.alibi:  # [B, N]: the head's slope, or the group's slopes.
    specs.append(pl.BlockSpec((None, None if query_major else group),
                              lambda i, b, h: (b, h)))
    arrays.append(alibi_slopes)
  geometry = dict(block_q=block_q, block_k=block_k, seq_len_q=seq_len_q,
                  seq_len_k=seq_len_k, query_major=query_major,
                  q_block=q_block)
  for on, array in ((score.has_bias, bias), (mask.has_mask_array, mask_array)):
    if on:
      specs.append(pair_array_spec(array, group=group, **geometry))
      arrays.append(array)
  if dropout.active:  # two 0-d refs into a [2, 1] array
    for word in (0, 1):
      specs.append(pl.BlockSpec((None, None), lambda i, b, h, w=word: (w, 0)))
      arrays.append(seeds.reshape(2, 1))
  if mask.has_segments:
    more_specs, more_arrays = segment_inputs(segments, **geometry)
    specs += more_specs
    arrays += more_arrays
  return specs, arrays
