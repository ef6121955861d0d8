"""The attention mask rule, in one place for every kernel and the reference.

Query row i sits at position p(i) = i + offset: offset 0 aligns the first query
with the first key (top-left, `jax.nn`), offset S - T aligns the last query with
the last key (bottom-right, FlashAttention's convention for T != S). Row i sees
key j (0 <= j < S) when all of these hold:
  * is_causal:            j <= p(i)
  * window (left, right): p(i) - left <= j <= p(i) + right   (None: unbounded)
  * segment ids:          q_segment[i] == kv_segment[j]   (padding lengths are
                          folded into segment ids by `lengths_to_segments`)
  * a boolean mask array: mask[b, n, i, j] (broadcast over size-1 axes)

    causal, T=3, S=5, top-left     causal, T=3, S=5, bottom-right
        j: 0 1 2 3 4                   j: 0 1 2 3 4
    i=0    x . . . .               i=0    x x x . .
    i=1    x x . . .               i=1    x x x x .
    i=2    x x x . .               i=2    x x x x x

The block-range helpers tell a kernel which key blocks a query block visits (and
the converse for dK/dV) as four bounds `(start, full_start, full_end, end)`:
blocks in [full_start, full_end) are wholly visible and skip the element-wise
mask, blocks in [start, full_start) and [full_end, end) need it, the rest are
skipped. They work on Python ints and traced int32 scalars alike. Segment ids
mask every block, unless the caller narrows the position runs by the segment
runs of `segment_block_ranges` (`segment_runs=True`).
"""
import dataclasses

import jax.numpy as jnp
from jax import lax

# Segment ids that padding takes: distinct, so padded rows see no key.
PAD_QUERY_SEGMENT = -(2 ** 31)
PAD_KEY_SEGMENT = -(2 ** 31) + 1


def _is_int(*xs):
  return all(isinstance(x, int) for x in xs)


def _min(a, b):
  return min(a, b) if _is_int(a, b) else jnp.minimum(a, b)


def _max(a, b):
  return max(a, b) if _is_int(a, b) else jnp.maximum(a, b)


def _select(cond, a, b):
  return (a if cond else b) if _is_int(a, b) else jnp.where(cond, a, b)


def unbounded_below(lo):
  """Whether a `key_interval` lower bound is the int 0, which no key index
  falls below (so it need not be compared)."""
  return isinstance(lo, int) and lo == 0


def within(key, lo=None, hi=None):
  """lo <= key <= hi, comparing only the bounds given (at least one):
  `MaskRule.key_interval`'s, or those made relative to a tile."""
  below = None if hi is None else key <= hi
  above = None if lo is None else key >= lo
  if above is None or below is None:
    return below if above is None else above
  return jnp.logical_and(below, above)


def run_bound(run: str, *, query_major: bool) -> str:
  """The one position bound that cuts the blocks of masked run `run`
  ("leading" or "trailing") where `MaskRule.one_sided_runs` holds: "lo"
  (the window's left) for the leading key blocks (query_major: the band's
  far edge) and the trailing query blocks, "hi" (causal, window right, S)
  for the others (the diagonal)."""
  return "lo" if (run == "leading") == query_major else "hi"


def check_token_count(value, name: str = "key_span"):
  """Raises on a token count given to the tile defaults (`key_span`: the
  most keys a query row can see, `MaskRule.key_span`; `unmasked_len`) that
  is not an int >= 0 or None."""
  if value is not None and (isinstance(value, bool)
                            or not isinstance(value, int)):
    raise TypeError(f"{name} must be an int or None, got "
                    f"{type(value).__name__}")
  if value is not None and value < 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def _clamp(x, lo, hi):
  return _min(_max(x, lo), hi)


def _floordiv_nonneg(a, b: int):
  """floor(max(a, 0) / b)."""
  a = _max(a, 0)
  return a // b if _is_int(a) else lax.div(a, b)


def _cdiv_nonneg(a, b: int):
  """ceil(max(a, 0) / b)."""
  return _floordiv_nonneg(_max(a, 0) + (b - 1), b)


# From this many queries and keys on, a causal mask cuts few enough blocks
# for 256-key tiles at head_dim 64 (H100: 4k 410 -> 422 TFLOP/s forward,
# 16k 460 -> 466; 1k 303 -> 268; benchmarks/NOTES.md items 18 and 21).
LONG_CAUSAL = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskRule:
  """Which (query, key) pairs are visible; hashable, so usable as a static.

  Attributes:
    seq_len_q, seq_len_k: T and S.
    is_causal: keys after the query's position are hidden.
    offset: query i sits at position i + offset (0 top-left, S - T
      bottom-right).
    window_left, window_right: the local window around the query's position;
      None is unbounded on that side.
    has_segments: the element-wise rule also compares segment ids.
    has_mask_array: the element-wise rule also reads a boolean mask array.
  """
  seq_len_q: int
  seq_len_k: int
  is_causal: bool = False
  offset: int = 0
  window_left: int | None = None
  window_right: int | None = None
  has_segments: bool = False
  has_mask_array: bool = False

  @property
  def dense_blocks(self) -> bool:
    """Whether a block can be wholly visible from positions alone."""
    return not (self.has_segments or self.has_mask_array)

  @property
  def key_span(self) -> int | None:
    """The most keys one query row can see by position alone (a local
    window's width, its right side capped by causality); None if unbounded."""
    right = self.window_right
    if self.is_causal:
      right = 0 if right is None else min(right, 0)
    if self.window_left is None or right is None:
      return None
    return max(0, self.window_left + right + 1)

  @property
  def cuts_blocks(self) -> bool:
    """Whether a block can be partly visible (positions, segments or a mask
    array): where wider key tiles waste work on the cut ones."""
    return self.has_position_mask or not self.dense_blocks

  @property
  def unmasked_len(self) -> int | None:
    """min(T, S) where no mask cuts any block (the tile defaults'
    argument), else None."""
    return None if self.cuts_blocks else min(self.seq_len_q, self.seq_len_k)

  @property
  def cuts_many_blocks(self) -> bool:
    """Whether wide key tiles waste much work on cut blocks: a window,
    segment ids, a mask array, or a causal mask over fewer than
    `LONG_CAUSAL` queries or keys (with 128-row query tiles and 256-key
    blocks, the diagonal is a quarter of the visited blocks at 1k, an
    eighth at 4k)."""
    causal_only = self.is_causal and (self.window_left, self.window_right
                                      ) == (None, None) and self.dense_blocks
    long_causal = causal_only and min(self.seq_len_q,
                                      self.seq_len_k) >= LONG_CAUSAL
    return self.cuts_blocks and not long_causal

  @property
  def has_position_mask(self) -> bool:
    return (self.is_causal or self.window_left is not None
            or self.window_right is not None)

  def key_loops(self, *, segment_runs: bool = False) -> dict:
    """Which of the three key-block loops (see `key_blocks`) can be non-empty.

    With segments, `key_blocks` puts every block in the leading loop (unless
    `segment_runs`: then all three may hold blocks); with a mask array the
    middle (unmasked) loop is empty.
    """
    if self._segment_runs(segment_runs):
      return self._all_loops()
    return dict(leading=self.window_left is not None or self.has_segments,
                middle=self.dense_blocks, trailing=not self.has_segments)

  def query_loops(self, *, segment_runs: bool = False) -> dict:
    """Which of the three query-block loops (`query_blocks`) can be
    non-empty; `segment_runs` as in `key_loops`."""
    if self._segment_runs(segment_runs):
      return self._all_loops()
    return dict(leading=self.has_position_mask or self.has_segments,
                middle=self.dense_blocks,
                trailing=(self.window_left is not None or self.has_mask_array)
                and not self.has_segments)

  def _segment_runs(self, segment_runs: bool) -> bool:
    """Whether the block ranges keep their position runs under segment ids
    (the caller narrows them to the segment runs of
    `segment_block_ranges`, as `mosaic_tiles.narrowed` does)."""
    if not isinstance(segment_runs, bool):
      raise TypeError(f"segment_runs must be a bool, got {segment_runs!r}")
    return segment_runs and self.has_segments

  def _all_loops(self) -> dict:
    return dict(leading=True, middle=not self.has_mask_array, trailing=True)

  def visible(self, q_idx, k_idx, q_segment=None, kv_segment=None,
              mask_tile=None):
    """Element-wise visibility; all arguments broadcast against each other.

    Args:
      q_idx: int32 query rows, e.g. [block_q, 1] (or [1, block_q]).
      k_idx: int32 key columns, e.g. [1, block_k] (or [block_k, 1]).
      q_segment, kv_segment: int32 segment ids shaped like q_idx and k_idx;
        required when `has_segments`.
      mask_tile: bool, broadcastable likewise; required when `has_mask_array`.
    Returns:
      bool, broadcastable to the indices' broadcast shape (terms that do not
      involve q_idx are not broadcast over it): True where the query attends.
    """
    # By position: the query's key interval, the one rule every kernel
    # compares against (`key_interval`).
    lo, hi = self.key_interval(q_idx + self.offset)
    ok = within(k_idx, None if unbounded_below(lo) else lo, hi)
    if self.has_segments:
      ok = jnp.logical_and(ok, q_segment == kv_segment)
    if self.has_mask_array:
      ok = jnp.logical_and(ok, mask_tile)
    return ok

  def key_interval(self, pos):
    """[lo, hi]: the keys that position(s) `pos` see by the position rules
    (causal, window, S) alone; ints where a bound does not depend on pos."""
    return self._key_range(pos, pos)

  def _key_range(self, lo_pos, hi_pos):
    """[lo, hi]: keys in S seen from position `lo_pos` on the left (window)
    and `hi_pos` on the right (causal, window). With the block's first and
    last positions: the keys some row sees; swapped, those every row sees."""
    lo, hi = 0, self.seq_len_k - 1
    if self.is_causal:
      hi = _min(hi, hi_pos)
    if self.window_right is not None:
      hi = _min(hi, hi_pos + self.window_right)
    if self.window_left is not None:
      lo = _max(lo, lo_pos - self.window_left)
    return lo, hi

  def key_blocks(self, q_block, block_q: int, block_k: int, *,
                 segment_runs: bool = False):
    """Key blocks that query block `q_block` visits (see the module doc).

    With segment ids every block is masked (the leading run), unless
    `segment_runs`: then the runs are those of positions alone, for the
    caller to narrow to the blocks whose segments match wholly."""
    num_k_blocks = -(-self.seq_len_k // block_k)
    first_pos = q_block * block_q + self.offset
    last_pos = first_pos + block_q - 1
    # Visited: keys that some row of the block may see.
    lo, hi = self._key_range(first_pos, last_pos)
    start = _min(_floordiv_nonneg(lo, block_k), num_k_blocks)
    # hi < lo: no row sees a key (e.g. a window past S); visit nothing, so
    # that key_blocks and query_blocks are exact inverses.
    end = _clamp(_cdiv_nonneg(hi + 1, block_k), start, num_k_blocks)
    end = _select(lo > hi, start, end)
    # Wholly visible: keys that every row of the block sees.
    full_lo, full_hi = self._key_range(last_pos, first_pos)
    full_start = _clamp(_cdiv_nonneg(full_lo, block_k), start, end)
    full_end = _clamp(_floordiv_nonneg(full_hi + 1, block_k), full_start, end)
    return self._masked_runs(start, full_start, full_end, end, segment_runs)

  def query_blocks(self, k_block, block_q: int, block_k: int, *,
                   segment_runs: bool = False):
    """Query blocks that key block `k_block` is seen by (see the module doc;
    `segment_runs` as in `key_blocks`).

    Keys past S are never stored by the dK/dV kernel, and rows past T carry
    P = 0 there, so neither needs masking: only positions and segments do.
    """
    num_q_blocks = -(-self.seq_len_q // block_q)
    first_key = k_block * block_k
    last_key = _min(first_key + block_k - 1, self.seq_len_k - 1)
    # Visited: rows whose position may see some key of the block.
    pos_lo, pos_hi = None, None
    if self.is_causal:
      pos_lo = first_key
    if self.window_right is not None:
      lo = first_key - self.window_right
      pos_lo = lo if pos_lo is None else _max(pos_lo, lo)
    if self.window_left is not None:
      pos_hi = last_key + self.window_left
    start = 0 if pos_lo is None else _min(
        _floordiv_nonneg(pos_lo - self.offset, block_q), num_q_blocks)
    end = num_q_blocks if pos_hi is None else _clamp(
        _cdiv_nonneg(pos_hi - self.offset + 1, block_q), start, num_q_blocks)
    # Wholly visible: rows whose position sees every key of the block.
    full_lo, full_hi = None, None
    if self.is_causal:
      full_lo = first_key + block_k - 1
    if self.window_right is not None:
      lo = first_key + block_k - 1 - self.window_right
      full_lo = lo if full_lo is None else _max(full_lo, lo)
    if self.window_left is not None:
      full_hi = first_key + self.window_left
    full_start = start if full_lo is None else _clamp(
        _cdiv_nonneg(full_lo - self.offset, block_q), start, end)
    full_end = end if full_hi is None else _clamp(
        _floordiv_nonneg(full_hi - self.offset + 1, block_q), full_start, end)
    return self._masked_runs(start, full_start, full_end, end, segment_runs)

  def one_sided_runs(self, block_q: int, block_k: int, *,
                     query_major: bool) -> bool:
    """Whether each masked run is cut by one position bound only, in every
    tile: in `key_blocks` (query_major) the leading run's key blocks by the
    window's left bound and the trailing run's by the right one (causal or
    window right, and S); in `query_blocks` the leading run's query blocks
    by the right bound and the trailing run's by the left one. Then a
    masked block needs one compare per element, not two (`run_bound`
    names it; `mosaic_tiles.tile_visible`): the same visibility, checked on
    every tile's bounds (Python ints), so that a narrow window or a partial
    last key block simply answers False. Never with segment ids or a mask
    array (their runs are not the position runs)."""
    if (self.has_segments or self.has_mask_array
        or self.window_left is None or not self.has_position_mask):
      return False
    if query_major:  # rows [first, last] of query block i
      for i in range(-(-self.seq_len_q // block_q)):
        start, full_start, full_end, end = self.key_blocks(i, block_q,
                                                           block_k)
        first = i * block_q + self.offset
        last = first + block_q - 1
        # Leading: no key of it may pass the first row's right bound;
        # trailing: none may precede the last row's left bound.
        if (start < full_start
            and full_start * block_k - 1 > self.key_interval(first)[1]):
          return False
        if (full_end < end
            and full_end * block_k < self.key_interval(last)[0]):
          return False
      return True
    for j in range(-(-self.seq_len_k // block_k)):
      start, full_start, full_end, end = self.query_blocks(j, block_q,
                                                           block_k)
      first_key = j * block_k
      last_key = first_key + block_k - 1
      # Leading rows (before the diagonal): none may be cut by its left
      # bound; trailing rows (past the band): none by its right bound.
      if start < full_start and self.key_interval(
          full_start * block_q - 1 + self.offset)[0] > first_key:
        return False
      if full_end < end and self.key_interval(
          full_end * block_q + self.offset)[1] < last_key:
        return False
    return True

  def _masked_runs(self, start, full_start, full_end, end, segment_runs):
    """The bounds as `key_loops` / `query_loops` compile them: with segment
    ids all of [start, end) is the leading run (the only one compiled then)
    unless `segment_runs`; with a mask array the middle run is empty."""
    if self.has_segments and not self._segment_runs(segment_runs):
      return start, end, end, end
    if self.has_mask_array:
      full_end = full_start
    return start, full_start, full_end, end


def lengths_to_segments(q_segment_ids, kv_segment_ids, q_lengths, kv_lengths,
                        *, batch: int, seq_len_q: int, seq_len_k: int):
  """Folds padding lengths into segment ids, so one rule masks both.

  Args:
    q_segment_ids [B, T], kv_segment_ids [B, S] int32, or None (one segment).
    q_lengths, kv_lengths [B] int32, or None (no padding).
  Returns:
    (q_segments [B, T], kv_segments [B, S]) int32, where rows past q_length
    take PAD_QUERY_SEGMENT and keys past kv_length PAD_KEY_SEGMENT; or None
    when nothing was given.
  """
  if all(x is None for x in (q_segment_ids, kv_segment_ids, q_lengths,
                             kv_lengths)):
    return None
  q_seg = (jnp.zeros((batch, seq_len_q), jnp.int32) if q_segment_ids is None
           else q_segment_ids.astype(jnp.int32))
  kv_seg = (jnp.zeros((batch, seq_len_k), jnp.int32) if kv_segment_ids is None
            else kv_segment_ids.astype(jnp.int32))
  if q_lengths is not None:
    rows = jnp.arange(seq_len_q, dtype=jnp.int32)[None, :]
    q_seg = jnp.where(rows < q_lengths[:, None], q_seg, PAD_QUERY_SEGMENT)
  if kv_lengths is not None:
    cols = jnp.arange(seq_len_k, dtype=jnp.int32)[None, :]
    kv_seg = jnp.where(cols < kv_lengths[:, None], kv_seg, PAD_KEY_SEGMENT)
  return q_seg, kv_seg


def segment_block_ranges(q_seg, kv_seg, block_q: int, block_k: int):
  """Per-block ranges of blocks that can hold a matching segment pair, and
  the run inside them where every pair matches.

  Block i of queries and block j of keys can match only if their id ranges
  [min, max] intersect. For sorted ids (packed documents) the matching blocks
  are contiguous, so [first, end) skips all the others; for unsorted ids
  the range may include blocks that the element-wise mask then discards.
  The pair matches wholly when both blocks are complete and hold one id,
  the same: [whole_first, whole_end) is the run of such blocks (empty
  unless they are contiguous, as for sorted ids), where a kernel may skip
  the segment comparison.

  Args:
    q_seg [B, T], kv_seg [B, S] int32.
  Returns:
    key_range [B, num_q_blocks, 4] and query_range [B, num_k_blocks, 4]
    int32: (first, end, whole_first, whole_end) block bounds; first == end
    when nothing matches, whole_first == whole_end when no pair is whole.
  """
  def block_ids(seg, block):
    """Per block: min id, max id, and whether it holds one id throughout."""
    batch, length = seg.shape
    num = -(-length // block)
    # Pad with a copy of the last id so that padding does not widen the range.
    padded = jnp.pad(seg, ((0, 0), (0, num * block - length)), mode="edge")
    tiles = padded.reshape(batch, num, block)
    lo, hi = tiles.min(-1), tiles.max(-1)
    complete = (jnp.arange(num) + 1) * block <= length
    return lo, hi, jnp.logical_and(lo == hi, complete)

  q_min, q_max, q_one = block_ids(q_seg, block_q)
  k_min, k_max, k_one = block_ids(kv_seg, block_k)
  # [B, nq, nk]: can query block i and key block j match, and do they wholly?
  meet = jnp.logical_and(q_min[:, :, None] <= k_max[:, None, :],
                         k_min[:, None, :] <= q_max[:, :, None])
  whole = (q_one[:, :, None] & k_one[:, None, :]
           & (q_min[:, :, None] == k_min[:, None, :]))

  def run(flags):
    """[first, last + 1) of the set flags along the last axis ([0, 0) if
    none)."""
    idx = jnp.arange(flags.shape[-1], dtype=jnp.int32)
    any_set = jnp.any(flags, axis=-1)
    first = jnp.where(any_set, jnp.min(jnp.where(flags, idx, flags.shape[-1]),
                                       axis=-1), 0)
    end = jnp.where(any_set, jnp.max(jnp.where(flags, idx, -1), axis=-1) + 1,
                    0)
    return first, end

  def bounds(meet, whole):
    first, end = run(meet)
    whole_first, whole_end = run(whole)
    # Empty unless every block in between matches wholly too.
    contiguous = whole.sum(-1) == whole_end - whole_first
    whole_end = jnp.where(contiguous, whole_end, whole_first)
    return jnp.stack([first, end, whole_first, whole_end],
                     axis=-1).astype(jnp.int32)

  key_range = bounds(meet, whole)
  query_range = bounds(jnp.swapaxes(meet, 1, 2), jnp.swapaxes(whole, 1, 2))
  return key_range, query_range
