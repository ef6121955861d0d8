"""Pieces shared by the Mosaic GPU (Hopper) kernels: geometry, padding,
shared-memory tiles, and the element-wise mask of one wgmma tile.

Every Hopper kernel is warp-specialized: `CONSUMERS` warpgroups compute (each
owns a 64-row wgmma tile) and one producer warpgroup issues the TMA copies
that fill a ring of `stages` shared-memory slots. A slot is full when its
"ready" barrier completes (the copy engine counts the bytes in) and free again
when every consumer has arrived on its "free" barrier.

The wrappers pad the sequences to whole tiles and head_dim to 64, 128 or 256
(zeros: they add nothing to q.k, and the padded output columns are sliced
off); the forward pads K and V only to `TMA_ROWS` rows (`kv_rows`): TMA
fills the rest of a last key block with zeros. Keys past S are hidden by the
mask rule (`MaskRule.seq_len_k` is the true S); padded query rows are
computed and dropped.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

from pallas_kernels import schedule
from pallas_kernels.mask import (MaskRule, PAD_KEY_SEGMENT, PAD_QUERY_SEGMENT,
                                 check_token_count, run_bound,
                                 segment_block_ranges, unbounded_below,
                                 within)

CONSUMERS = 2    # compute warpgroups per CTA (the forward's: `consumers`)
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.float16, jnp.bfloat16)
# Registers per thread (consumer, producer) by the number of consumer
# warpgroups: consumers take what the producer gives up ((2 * 232 + 40) *
# 128 and (3 * 160 + 32) * 128 threads fit the 64K register file).
REGISTERS = {2: (232, 40), 3: (160, 32)}
# FA3's split for two consumers, (2 * 240 + 24) * 128 threads: the dK/dV
# kernel's where it pays (`mosaic_backward._dkdv_registers`).
REGISTERS_LEAN_PRODUCER = (240, 24)


# The tiles that may also be 32 wide: the backward's streamed blocks (the
# dQ kernel's keys, the dK/dV kernel's queries), which at head_dim 256 keep
# its rings within shared memory (only there: the backward raises
# NotImplementedError for them at head_dim <= 128).
NARROW_FIELDS = ("block_k_dq", "block_q_dkv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicBlocks:
  """Tiles of the Hopper kernels (each a multiple of 64, or 32 in
  NARROW_FIELDS); hashable.

  block_q: query rows per consumer warpgroup in the forward and dQ kernels
    (a CTA holds CONSUMERS * block_q rows).
  block_k: keys per pipeline step in the forward (a masked block of 256
    runs as two 128-key sub-steps, `MASKED_SUB_STEP`).
  block_k_dq: keys per pipeline step in the dQ kernel.
  block_q_dkv, block_k_dkv: the dK/dV kernel streams [block_q_dkv, H] tiles
    of Q and dO past CONSUMERS * block_k_dkv resident keys. block_k_dq and
    block_q_dkv may be 32 (at head_dim 256 only, its default; the backward
    raises NotImplementedError for them below).
  stages: depth of the shared-memory ring of every kernel (the forward's:
    `forward_stages` where set). A kernel whose
    buffers then pass the 227 KiB of a CTA's shared memory raises
    NotImplementedError naming the fields that size it (at head_dim 128 the
    dQ kernel fits 2 stages, not 3; the forward 3 with 128-key blocks, 2
    with 192; segment ids need 2 with 128).
  fused_dq: the dK/dV kernel also computes dQ (5 matmuls per tile instead
    of 7 with the separate dQ kernel), adding its partial dQ tiles into a
    float32 buffer in key-tile order (deterministic). True: wherever it can
    (head_dim pads to 128, or to 64 with block_q_dkv >= 128; elsewhere, at
    head_dim > 128 or 64 with 64-row blocks, the separate dQ kernel runs).
    None (the default): only where it was measured faster on an H100, at
    head_dim 64 without segment ids: with no mask, from 16 steps per key
    tile where the walk rotates (T >= S; from 2k tokens), else from 64;
    under a causal mask or window, from 16 steps (4k causal) where the
    longest key tile is short against an SM's share (not with 4 query heads
    per kv head at 16k) (benchmarks/NOTES.md items 13, 19, 42 and 43), and
    only where the fused kernel fits in shared memory (not with 3 stages).
    False: never.
  overlap: the forward overlaps each consumer's softmax with its own
    matmuls (block j's S = Q K^T issued with block j-1's O += P V; FA3's
    intra-warpgroup pipelining), on top of the ping-pong between the two
    consumers. Off by default: on an H100 it was level at head_dim 128
    without a mask, and slower at head_dim 64 and under a causal mask
    (benchmarks/NOTES.md item 20).
  pingpong_across_tiles: in the forward, the consumers' ping-pong runs on
    from one tile of a CTA to its next (one consumer's output and next Q
    overlap the other's last steps) instead of restarting each tile. On by
    default at head_dim 64, where the softmax is the longer part of a step:
    without a mask +3% at 16k, +6% at 4k and +10% at 1k on an H100; at 128
    it was 1-2% slower (benchmarks/NOTES.md item 28). Only persistent CTAs
    (several tiles each) see a difference; with `overlap` the consumers'
    turns already run on.
  persistent: the forward and the dK/dV and dQ kernels run one CTA per SM
    that loops over its tiles, loading the next tile's Q (dK/dV: K and V;
    dQ: Q and dO) while it finishes the current one where two such slots
    and the ring fit in shared memory (head_dim <= 128 with 2 stages; dQ:
    64). Takes effect where `Tiles.make` takes a static schedule (the
    forward: not a causal mask over 16k tokens at head_dim 128; dK/dV: key
    tiles averaging at most 64 steps, 32 where they differ in length, and
    no fused dQ; dQ: query tiles averaging at most 16 key blocks);
    otherwise one CTA per tile.
  consumers: the forward's compute warpgroups, 2 or 3 (a tile of consumers
    * block_q rows). With 3 each has 160 registers, so only at head_dim 64
    with block_k <= 128, or 128 with block_k 64, and without `overlap`;
    they take turns at the tensor cores in a ring (each issues its O += P V
    and next S = Q K^T in its turn, so the others' softmaxes run
    meanwhile). The other kernels always have 2. The default takes 3 only
    at head_dim 64 with no mask from `THREE_CONSUMERS_MIN_LEN` tokens.
  forward_stages: the forward's ring depth where it differs from `stages`
    (None: `stages`), so that a forward tuned deeper leaves the backward's
    kernels as they are.
  cluster: the forward's CTAs per cluster, 1 or 2. With 2, a cluster runs
    two adjacent query tiles of one head in step, and each K and V block
    is read from L2 once for both: each CTA loads half of it and TMA
    multicasts it to both (FlashAttention-3's non-causal forward at
    head_dim >= 128). Only where both tiles of every pair visit the same
    key blocks (no causal mask, window or segment ids); elsewhere it
    raises NotImplementedError. 1-3% faster without a mask (not at head_dim
    256): the default from `CLUSTER_MIN_LEN` tokens where the query tiles
    pair up. Each row's result is bitwise that of cluster=1.
  """
  block_q: int = 64
  block_k: int = 128
  block_k_dq: int = 128
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  stages: int = 2
  fused_dq: bool | None = None
  overlap: bool = False
  pingpong_across_tiles: bool = False
  persistent: bool = True
  consumers: int = 2
  forward_stages: int | None = None
  cluster: int = 1

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_k_dq", "block_q_dkv",
                  "block_k_dkv"):
      value = getattr(self, field)
      narrow = field in NARROW_FIELDS and value == 32
      if (not isinstance(value, int) or isinstance(value, bool) or value <= 0
          or value % 64 and not narrow):
        raise ValueError(
            f"MosaicBlocks.{field} must be a positive multiple of 64"
            + (" or 32" if field in NARROW_FIELDS else "")
            + f", got {value!r}")
    for field in ("stages", "forward_stages"):
      value = getattr(self, field)
      if field == "forward_stages" and value is None:
        continue
      if (not isinstance(value, int) or isinstance(value, bool)
          or not 2 <= value <= 4):
        raise ValueError(f"MosaicBlocks.{field} must be an int in [2, 4], "
                         f"got {value!r}")
    for field in ("overlap", "pingpong_across_tiles", "persistent"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"MosaicBlocks.{field} must be a bool, got "
                         f"{getattr(self, field)!r}")
    if (not isinstance(self.consumers, int) or isinstance(self.consumers, bool)
        or self.consumers not in REGISTERS):
      raise ValueError(f"MosaicBlocks.consumers must be one of "
                       f"{tuple(REGISTERS)}, got {self.consumers!r}")
    if self.consumers > 2 and (self.block_k > 128 or self.overlap):
      raise NotImplementedError(
          f"MosaicBlocks.consumers={self.consumers} needs block_k <= 128 "
          f"(got {self.block_k}) and overlap=False (got {self.overlap}): "
          f"its consumers have 160 registers")
    if (not isinstance(self.cluster, int) or isinstance(self.cluster, bool)
        or self.cluster not in (1, 2)):
      raise ValueError(f"MosaicBlocks.cluster must be 1 or 2, got "
                       f"{self.cluster!r}")
    if self.fused_dq is not None and not isinstance(self.fused_dq, bool):
      raise ValueError(f"MosaicBlocks.fused_dq must be a bool or None, got "
                       f"{self.fused_dq!r}")


# At head_dim 128 the forward's ping-pong runs on across tiles only under a
# local window at most this wide (`MaskRule.key_span`): its tiles are short
# (at most 17 key blocks), and restarting at each one cost 2-4% there (16k,
# window 1k: 0.261 / 0.267 ms against 0.257 / 0.256; benchmarks/NOTES.md
# item 39), while unmasked 4k tiles were 1-2% slower running on (item 28).
PINGPONG_ACROSS_KEY_SPAN = 2048


# At head_dim 128 under such a window, the dQ kernel's key blocks: each
# query tile visits few of them, and 64-key blocks waste fewer masked keys
# on the band's edges. 1k window at 16k, bwd 0.854 / 0.846 ms against
# 0.883 / 0.883 with 128 (benchmarks/NOTES.md item 69).
NARROW_WINDOW_BLOCK_K_DQ = 64


# At head_dim 64 without any mask, from this many queries and keys the
# forward runs 3 consumers (192-row tiles) with 128-key blocks in 3 stages:
# on an H100 499-509 against 485-490 TFLOP/s at 16k, 500-503 against
# 488-501 at 8k, but 443-449 against 476-491 at 4k (benchmarks/NOTES.md
# item 45).
THREE_CONSUMERS_MIN_LEN = 8192


# At head_dim 128 without any mask, from this many queries and keys the
# forward takes 192-key blocks (S is [64, 192] float32, 96 registers; FA3
# takes 176): on an H100 647-654 against 615-620 TFLOP/s at 16k, 657-663
# against 614-618 at 32k, 624-648 against 595-617 at 8k; mixed at 4k (607-643
# against 612-633), and slower under a causal mask (604 against 615 at 16k)
# or a window, and wherever a Q prefetch slot is lost on short tiles
# (benchmarks/NOTES.md item 46).
WIDE_KEYS_MIN_LEN = 8192


# At head_dim <= 128 without any mask, from this many queries and keys the
# forward runs in two-CTA clusters multicasting K and V
# (`MosaicBlocks.cluster`). On an H100 (bf16, 16k tokens, alternated in one
# process under sustained load; benchmarks/NOTES.md item 68), TFLOP/s with
# against without: head_dim 128 at 1k 539-542 / 533-536, 2k 573-584 /
# 569-571, 4k 597-602 / 583-595, 16k 665-667 / 660-663; head_dim 64 at 1k
# 452-455 / 444-448, 4k 481 / 468-469, 16k 508 / 507. Head_dim 256 was mixed
# (614 / 603-626), and it is not the L2: the K/V stream alone runs at 18
# TB/s, four times what the forward needs.
CLUSTER_MIN_LEN = 1024


def default_mosaic_blocks(head_dim: int, *, masked: bool = True,
                          key_span: int | None = None,
                          unmasked_len: int | None = None,
                          seq_len_q: int | None = None) -> MosaicBlocks:
  """The Hopper tiles for a head_dim (swept on an H100,
  benchmarks/tune_mosaic.py): narrower key tiles at 256 (registers and
  shared memory: Q is 64 KiB there), and 32-row streamed blocks in its
  backward (`NARROW_FIELDS`); at 64, 128-row query tiles in dK/dV
  and, where no mask cuts many blocks (`masked=False`: no window or segment
  ids, and no causal mask or one over at least 4096 tokens,
  `MaskRule.cuts_many_blocks`), 256-key forward tiles (+3-4% at 1k-16k
  without a mask, +1-3% causal from 4k on; a causal diagonal over 1k
  tokens wastes more of them: 268 vs 303 TFLOP/s; benchmarks/NOTES.md
  items 18 and 21), and the ping-pong running on across tiles (item 28),
  as at 128 under a window of at most `PINGPONG_ACROSS_KEY_SPAN` keys
  (`key_span`: the most keys a query row can see, `MaskRule.key_span`;
  None when unbounded). `unmasked_len`: min(T, S) where no mask cuts any
  block (no causal mask, window or segment ids), else None. Under a
  window that narrow, head_dim 128's dQ kernel takes
  `NARROW_WINDOW_BLOCK_K_DQ`-key blocks. From
  `THREE_CONSUMERS_MIN_LEN` at head_dim 64 the forward takes 3 consumers,
  from `WIDE_KEYS_MIN_LEN` at 128 192-key blocks, and from `CLUSTER_MIN_LEN`
  at head_dim <= 128 two-CTA clusters where `seq_len_q` (T) makes an even
  number of query tiles (pairs need no padding tile)."""
  if not isinstance(masked, bool):
    raise TypeError(f"masked must be a bool, got {masked!r}")
  check_token_count(key_span)
  check_token_count(unmasked_len, "unmasked_len")
  check_token_count(seq_len_q, "seq_len_q")
  blocks = _default_tiles(head_dim, masked, key_span, unmasked_len)
  rows = blocks.consumers * blocks.block_q
  # The forward pads T to whole clusters of tiles (`mosaic_forward`): pair
  # only where that adds no tile.
  if (head_dim <= 128 and unmasked_len is not None
      and unmasked_len >= CLUSTER_MIN_LEN and seq_len_q is not None
      and round_up(seq_len_q, 2 * rows) == round_up(seq_len_q, rows)):
    blocks = dataclasses.replace(blocks, cluster=2)
  return blocks


def _default_tiles(head_dim: int, masked: bool, key_span: int | None,
                   unmasked_len: int | None) -> MosaicBlocks:
  """The default tiles before the cluster rule (`default_mosaic_blocks`)."""
  if head_dim > 128:
    return MosaicBlocks(block_q=64, block_k=64, block_k_dq=32,
                        block_q_dkv=32, block_k_dkv=64, stages=2)
  if head_dim <= 64:
    if unmasked_len is not None and unmasked_len >= THREE_CONSUMERS_MIN_LEN:
      return MosaicBlocks(block_q_dkv=128, block_k=128, consumers=3,
                          forward_stages=3, pingpong_across_tiles=True)
    return MosaicBlocks(block_q_dkv=128, block_k=128 if masked else 256,
                        pingpong_across_tiles=True)
  if unmasked_len is not None and unmasked_len >= WIDE_KEYS_MIN_LEN:
    return MosaicBlocks(block_k=192)
  if key_span is not None and key_span <= PINGPONG_ACROSS_KEY_SPAN:
    return MosaicBlocks(pingpong_across_tiles=True,
                        block_k_dq=NARROW_WINDOW_BLOCK_K_DQ)
  return MosaicBlocks()


# Streaming multiprocessors assumed when no GPU is visible (an H100 SXM), as
# when lowering for CUDA on a CPU host; only the persistent grid uses it.
DEFAULT_SMS = 132


def num_sms() -> int:
  """Streaming multiprocessors of the local GPU (`DEFAULT_SMS` if none)."""
  try:
    return jax.local_devices(backend="gpu")[0].core_count
  except RuntimeError:
    return DEFAULT_SMS


# Where tiles differ in length (causal), a persistent grid is used only
# while they average at most this many key blocks: longer tiles amortize a
# CTA's fixed cost anyway, and the hardware's dynamic order balances them
# by their true times (16k causal at head_dim 64: 450 TFLOP/s one CTA per
# tile, 426 persistent on an H100 with an older split; benchmarks/NOTES.md
# item 16). The forward sets its own (`mosaic_forward._max_mean_varied`).
MAX_MEAN_COST_VARIED = 32


# Shared memory as Pallas lays out a kernel's scratch: each buffer from a
# 1 KiB boundary, 8 bytes per barrier; a CTA may have 227 KiB on an H100
# or H200 (what Mosaic GPU also assumes when it sees no GPU).
SMEM_ALIGNMENT = 1024
BARRIER_BYTES = 8
DEFAULT_SMEM = 227 * 1024


def smem_limit() -> int:
  """The shared memory one CTA may have on the local GPU (`DEFAULT_SMEM`
  if none)."""
  try:
    device = jax.local_devices(backend="gpu")[0]
  except RuntimeError:
    return DEFAULT_SMEM
  return getattr(device, "shared_memory_per_block_optin", DEFAULT_SMEM)


def smem_bytes(scratch) -> int:
  """The shared memory of a kernel with this scratch tree (plgpu.SMEM
  buffers and plgpu.Barrier arrays). Matches what Mosaic GPU counts when it
  lowers each Hopper kernel (none reserves reduction scratch:
  `compiler_params`)."""
  size = 0
  for leaf in jax.tree.leaves(scratch):
    if isinstance(leaf, (plgpu.Barrier, plgpu.ClusterBarrier)):
      size += BARRIER_BYTES * math.prod(leaf.num_barriers)
    else:
      size += round_up(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize,
                       SMEM_ALIGNMENT)
  return size


def fits_smem(scratch) -> bool:
  """Whether a kernel with this scratch tree fits a CTA's shared memory."""
  return smem_bytes(scratch) <= smem_limit()


def check_smem(scratch, *, kernel: str, head_dim: int, blocks: "MosaicBlocks",
               fields):
  """NotImplementedError naming the MosaicBlocks `fields` that size the
  kernel's shared memory where its scratch does not fit in a CTA's (rather
  than Mosaic GPU's error when it compiles)."""
  if not fits_smem(scratch):  # the rule in one place; sized again to say so
    need, limit = smem_bytes(scratch), smem_limit()
    named = ", ".join(f"{f}={getattr(blocks, f)}" for f in fields)
    raise NotImplementedError(
        f"MosaicBlocks({named}) needs {need} bytes of shared memory in the "
        f"{kernel} at head_dim {head_dim}, more than the {limit} a CTA can "
        f"have: take fewer stages or smaller blocks")


# Shared memory a persistent kernel may fill with its two slots of per-tile
# operands and its ring (of the 227 KiB an H100 CTA can have, some left for
# statistics, segment ids and barriers).
PERSISTENT_SMEM = 200 * 1024


def fits_two_slots(own_rows: int, ring_rows: int, head_dim: int,
                   dtype) -> bool:
  """Whether a second slot of a CTA's own per-tile operands (own_rows rows
  of [H] in all: the forward's Q, the dK/dV kernel's K and V, the dQ
  kernel's Q and dO) fits in shared memory beside the first and the ring
  (ring_rows rows in all): what a persistent kernel needs to load the
  next tile's operands during this one."""
  row = jnp.dtype(dtype).itemsize * head_dim
  return (2 * own_rows + ring_rows) * row <= PERSISTENT_SMEM


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The (tile, head, batch) work items of a kernel parallel over tiles of
  one sequence (query tiles: forward, dQ; key tiles: dK/dV) and how its
  `num_ctas` CTAs (grid axis "cta") share them.

  Items are ordered by head and batch, and within a head heaviest first
  (`last_first`: the last query tile sees the most keys under a causal
  mask; the first key tile is seen by the most queries), so the tiles that
  read the same K and V (or Q and dO) run together. With one CTA per tile
  (`lists` None) the hardware schedules them in that order; with fewer
  (persistent), CTA c runs the items of `lists[c]` (`schedule.balanced`;
  with a tail, one CTA per SM and then single-item CTAs:
  `schedule.with_tail`), which the kernel reads from its "schedule" input
  (`inputs`, `bind`).

  With `cluster` = 2 an item is a pair of adjacent tiles (2i, 2i + 1),
  `num_tiles` counts pairs and `num_ctas` clusters (the grid), and CTA r of
  a cluster (axis "cluster") takes tile 2i + r of each item.
  """
  num_tiles: int
  num_heads: int
  batch: int
  num_ctas: int
  last_first: bool = True
  lists: tuple | None = None
  cluster: int = 1
  # The "schedule" input's ref, inside the kernel (`bind`).
  ref: object = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def make(cls, costs, num_heads: int, batch: int, *, persistent: bool,
           last_first: bool = True, max_mean_varied=None,
           tail_fraction: float = 0.0, cluster: int = 1) -> "Tiles":
    """costs[i]: the blocks tile i visits (its work); `max_mean_varied`
    (if not None) replaces `MAX_MEAN_COST_VARIED`; where persistent, the
    last `tail_fraction` of the items run one per CTA after the persistent
    CTAs (`schedule.with_tail`). With `cluster` = 2, costs[i] is pair i's
    (each of its tiles'), and the persistent grid has one cluster per two
    SMs."""
    num, sms = len(costs), num_sms() // cluster
    limit = (MAX_MEAN_COST_VARIED if max_mean_varied is None
             else max_mean_varied)
    one_per_tile = cls.one_per_tile(num, num_heads, batch,
                                    last_first=last_first, cluster=cluster)
    if not persistent or one_per_tile.total <= sms:
      return one_per_tile
    if max(costs) > min(costs) and sum(costs) > limit * num:
      return one_per_tile
    item_costs = one_per_tile.item_costs(costs)
    tail = min(int(tail_fraction * len(item_costs)), len(item_costs) - sms)
    lists = schedule.with_tail(item_costs, sms, tail)
    return cls(num, num_heads, batch, len(lists), last_first, lists, cluster)

  @classmethod
  def one_per_tile(cls, num_tiles: int, num_heads: int, batch: int, *,
                   last_first: bool = True, cluster: int = 1) -> "Tiles":
    return cls(num_tiles, num_heads, batch, num_tiles * num_heads * batch,
               last_first, cluster=cluster)

  @property
  def total(self) -> int:
    return self.num_tiles * self.num_heads * self.batch

  @property
  def persistent(self) -> bool:
    """Whether some CTA runs more than one tile."""
    return self.lists is not None

  def _tile(self, index_in_head):
    """The tile at a position within its head's run (ints or int32)."""
    if self.last_first:
      return self.num_tiles - 1 - index_in_head
    return index_in_head

  def item_costs(self, costs) -> list:
    """The cost of each item, in order, from each tile's (Python ints)."""
    return [costs[self._tile(flat % self.num_tiles)]
            for flat in range(self.total)]

  def table(self):
    """The "schedule" input: [num_ctas, 2 + most items] int32, row c
    holding CTA c's item count, then its items (flat indices), then zeros
    (so that the entry after the last one can be read too)."""
    width = 2 + max(map(len, self.lists))
    return np.array([[len(items), *items] + [0] * (width - 1 - len(items))
                     for items in self.lists], np.int32)

  def input_names(self) -> list:
    return ["schedule"] if self.persistent else []

  def inputs(self) -> tuple:
    return (jnp.asarray(self.table()),) if self.persistent else ()

  def bind(self, refs) -> "Tiles":
    """These tiles reading the kernel's "schedule" input from refs."""
    if not self.persistent:
      return self
    return dataclasses.replace(self, ref=refs["schedule"])

  def count(self, cta):
    """How many tiles CTA `cta` runs (an int32 scalar)."""
    return self.ref[cta, 0] if self.persistent else _i32(1)

  def _coords(self, flat):
    """(tile, head, batch) of the item at flat index `flat` (int32): with
    a cluster, this CTA's tile of the item's pair."""
    head_batch = lax.div(flat, _i32(self.num_tiles))
    tile = self._tile(lax.rem(flat, _i32(self.num_tiles)))
    if self.cluster > 1:
      tile = tile * _i32(self.cluster) + lax.axis_index("cluster")
    return (tile, lax.rem(head_batch, _i32(self.num_heads)),
            lax.div(head_batch, _i32(self.num_heads)))

  def at(self, cta, t):
    """(tile, head, batch) of CTA `cta`'s local tile t (int32 scalars)."""
    return self._coords(self.ref[cta, t + 1] if self.persistent else cta)

  def loop(self, body, carry):
    """carry = body(t, (tile, head, batch), carry) over this CTA's tiles
    (inside a kernel with grid axis "cta"); each tile's entry of the
    schedule is read one tile ahead."""
    cta = lax.axis_index("cta")
    if not self.persistent:
      return lax.fori_loop(0, 1, lambda t, c: body(t, self.at(cta, t), c),
                           carry)

    def step(t, state):
      carry, flat = state
      upcoming = self.ref[cta, t + 2]
      return body(t, self._coords(flat), carry), upcoming

    return lax.fori_loop(0, self.count(cta), step,
                         (carry, self.ref[cta, 1]))[0]


def _i32(n):
  return jnp.asarray(n, jnp.int32)


def padded_head_dim(head_dim: int) -> int:
  """64, 128 or 256: the head_dim the Hopper kernels compute with."""
  for h in HEAD_DIMS:
    if head_dim <= h:
      return h
  raise ValueError(f"head_dim {head_dim} exceeds {HEAD_DIMS[-1]}")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, value=0):
  """x zero- (or `value`-) padded along `axis` to `size`."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


# Mosaic GPU's TMA views a token axis in tiles of 8 rows: its length must be
# a multiple of 8 (or smaller than 8).
TMA_ROWS = 8


def kv_rows(seq_len_k: int, block_k: int) -> int:
  """Rows K and V are padded to for a kernel that reads them in blocks of
  block_k by TMA, which zero-fills rows past the array: a multiple of
  `TMA_ROWS`, and at least one block (no copy of K and V where S is long
  and a multiple of 8)."""
  return max(round_up(seq_len_k, TMA_ROWS), block_k)


def pad_tokens(x, seq_len: int, head_dim: int):
  """[B, L, heads, H] padded to [B, seq_len, heads, head_dim]."""
  return pad_axis(pad_axis(x, 1, seq_len), 3, head_dim)


def pad_segments(segments, seq_len_q: int, seq_len_k: int):
  """(q [B, T], kv [B, S]) segment ids padded to the tiles, or ()."""
  if segments is None:
    return ()
  q_seg, kv_seg = segments
  return (pad_axis(q_seg, 1, seq_len_q, PAD_QUERY_SEGMENT),
          pad_axis(kv_seg, 1, seq_len_k, PAD_KEY_SEGMENT))


def segment_ranges(padded, block_q: int, block_k: int, *,
                   query_major: bool):
  """() without segment ids; else (the [B, tiles, 4] int32 block ranges
  of `segment_block_ranges`: [first, end) can hold a matching segment
  pair, [whole_first, whole_end) match wholly,) per query tile of block_q
  rows over key blocks of block_k (query_major), or per key tile over
  query blocks: the `seg_range` input that `narrowed` reads."""
  if not padded:
    return ()
  key_range, query_range = segment_block_ranges(*padded, block_q, block_k)
  return (key_range if query_major else query_range,)


def narrowed(bounds, seg_range, batch, tile):
  """A tile's `MaskRule.key_blocks` / `query_blocks` runs narrowed by its
  segment runs, read from `seg_range` (`segment_ranges`) in global memory:
  visited are the blocks that can hold a matching pair; unmasked (the
  middle run) only those wholly visible by position and wholly matching by
  segment. With `segment_runs=True` bounds are the runs of positions alone;
  with the default (all of the range masked) they stay all masked. The
  bounds themselves where seg_range is None."""
  if seg_range is None:
    return bounds
  start, full_start, full_end, end = bounds
  first, last_end, whole_first, whole_end = (seg_range[batch, tile, i]
                                             for i in range(4))
  start = jnp.maximum(start, first)
  end = jnp.maximum(jnp.minimum(end, last_end), start)
  full_start = jnp.clip(jnp.maximum(full_start, whole_first), start, end)
  full_end = jnp.clip(jnp.minimum(full_end, whole_end), full_start, end)
  return start, full_start, full_end, end


def visited_runs(mask: MaskRule, seg_range, batch, tile, block_q: int,
                 block_k: int, *, query_major: bool):
  """(bounds, loops) of the blocks a tile visits, for `visit_runs`:
  query_major, the key blocks of query tile `tile` of block_q rows (forward,
  dQ); else the query blocks of key tile `tile` of block_k keys (dK/dV).
  With `seg_range` (`segment_ranges`), narrowed by the tile's segment runs
  (`narrowed`); without it, segment ids mask every block."""
  runs = seg_range is not None
  if query_major:
    bounds = mask.key_blocks(tile, block_q, block_k, segment_runs=runs)
    loops = mask.key_loops(segment_runs=runs)
  else:
    bounds = mask.query_blocks(tile, block_q, block_k, segment_runs=runs)
    loops = mask.query_loops(segment_runs=runs)
  return narrowed(bounds, seg_range, batch, tile), loops


def tile_smem(shape, dtype, swizzle: int = 128):
  """A shared-memory buffer of [..., rows, cols] tiles as wgmma and TMA
  read them: 8 rows x `swizzle` bytes per tile, swizzled as wide."""
  cols = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(swizzle)))


def swizzle_for(block: int) -> int:
  """The swizzle (bytes) of a kernel's operand tiles: wgmma contracts a
  shared-memory operand in groups of a swizzle's width (64 bf16 elements at
  128 bytes), so a kernel that contracts over 32-row blocks
  (`NARROW_FIELDS`) takes 64."""
  return 64 if block % 64 else 128


def compiler_params():
  """Every Hopper kernel's: fast approximate exp2, and no shared memory held
  back for cross-warp reductions (Pallas reserves 2 KiB by default): the
  forward's row max and sum reduce within a warp's lanes (a cross-warp one
  would fail to lower, not run wrong), and those 2 KiB let the head_dim 128
  forward take 192-key blocks or 3 stages (benchmarks/NOTES.md item 46)."""
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)


def wgmma_zeros(shape):
  """A float32 zero array in the wgmma accumulator layout."""
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def row_vector(value, rows: int):
  """A [rows] float32 vector laid out like a reduction over a tile's keys."""
  return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))


def load_vector(smem, axis: int):
  """A [n] vector from SMEM, laid out to broadcast along `axis` of a wgmma
  tile (axis 0: one value per row; axis 1: one per column)."""
  return plgpu.load(smem, layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def broadcast(vector, shape, axis: int):
  """vector [shape[axis]] repeated along the other axis of a 2-D tile."""
  return lax.broadcast_in_dim(vector, shape, [axis])


def tile_visible(mask: MaskRule, shape, row_start, col_start, *,
                 query_axis: int, q_seg=None, kv_seg=None, run=True,
                 one_sided: bool = False):
  """The mask rule on one [rows, cols] wgmma tile.

  Args:
    shape: the tile's shape; query_axis: which of its axes indexes queries
      (0 in the forward and dQ kernels, 1 in the dK/dV kernel).
    row_start, col_start: the first query and key index of the tile, in
      the order (queries, keys).
    q_seg, kv_seg: segment-id vectors from `load_vector` (or None).
    run: the run of `visit_runs` the tile is in ("leading", "trailing"; or
      True: unknown); with `one_sided` (`MaskRule.one_sided_runs` holds for
      the kernel's tiles) only the bound that cuts that run is compared.
  """
  key_axis = 1 - query_axis
  # Each query's visible keys by position are an interval [lo, hi]
  # (`MaskRule.key_interval`): at most two compares per element against
  # per-query bounds (vectors) relative to the tile's first key, instead of
  # `MaskRule.visible` on two index tiles (window fwd+bwd -9 to -14% on an
  # H100; benchmarks/NOTES.md item 26).
  lo, hi = 0, mask.seq_len_k - 1
  if mask.has_position_mask:  # (no position vector to lay out otherwise)
    pos = plgpu.broadcasted_iota(
        jnp.int32, (shape[query_axis],), 0,
        layout=plgpu.Layout.WGMMA.reduce(key_axis)) + (row_start + mask.offset)
    lo, hi = mask.key_interval(pos)
  sides = {"hi"} if unbounded_below(lo) else {"lo", "hi"}
  if one_sided and run in ("leading", "trailing"):
    sides = {run_bound(run, query_major=query_axis == 0)}
  key = plgpu.broadcasted_iota(jnp.int32, shape, key_axis,
                               layout=plgpu.Layout.WGMMA)
  bound = lambda b: (b - col_start if isinstance(b, int)
                     else broadcast(b - col_start, shape, query_axis))
  hi_key = bound(hi) if "hi" in sides else None
  lo_key = bound(lo) if "lo" in sides else None
  visible = within(key, lo_key, hi_key)
  if mask.has_segments:
    visible = jnp.logical_and(visible, broadcast(q_seg, shape, query_axis)
                              == broadcast(kv_seg, shape, key_axis))
  return visible


def copy_rows(refs, names, dst, barrier, *, batch, rows, head,
              multicast: bool = False):
  """TMA copies of the token rows `rows` of each named input, in order,
  into the shared-memory buffer dst(name), completing on `barrier`:
  tokens [B, L, heads, H] (q, k, v, do) and statistics [B, heads, L] (lse,
  delta) at `head`, segment ids [B, L]. `multicast`: every CTA of the
  cluster issues the same copy; each loads its share of the rows and
  multicasts it, so each CTA's buffer receives all of them."""
  collective = {"collective_axes": "cluster"} if multicast else {}
  for name in names:
    ref = refs[name]
    if ref.ndim == 4:
      src = ref.at[batch, rows, head]
    elif ref.ndim == 3:
      src = ref.at[batch, head, rows]
    else:
      src = ref.at[batch, rows]
    plgpu.copy_gmem_to_smem(src, dst(name), barrier, **collective)


def own_rows(tile, wg, block: int, consumers: int = CONSUMERS):
  """Consumer wg's share of a tile of consumers * block rows (or keys):
  (its first index, its pl.ds)."""
  first = tile * (consumers * block) + wg * block
  return first, pl.ds(first, block)


def own_slot(barrier, slot, wg, consumers: int = CONSUMERS):
  """Consumer wg's barrier of operand slot `slot` (`operand_slot`)."""
  return barrier.at[slot * consumers + wg]


def load_own(refs, scratch, names, barrier, *, tiles: "Tiles", cta, t, wg,
             slot, block: int, consumers: int = CONSUMERS):
  """Copies consumer wg's rows of CTA cta's local tile t (`own_rows`) of
  the named inputs into slot `slot` of their buffers, completing on
  `own_slot(barrier, slot, wg)`: the forward's Q, the dK/dV kernel's K
  and V."""
  tile, head, batch = tiles.at(cta, t)
  copy_rows(refs, names, lambda name: scratch[name].at[slot, wg],
            own_slot(barrier, slot, wg, consumers), batch=batch,
            rows=own_rows(tile, wg, block, consumers)[1], head=head)


# The step of a tile under which the next tile's operands start loading
# (`operand_slot`): the second, not the first, so that the wait for the
# previous tile's output stores to leave the slot (issued just before)
# does not hold up the tile's first matmuls.
PREFETCH_STEP = 1

# Keys per sub-step of a masked forward block wider than this (the
# forward's 256-key blocks at head_dim 64: mosaic_forward.split_step).
MASKED_SUB_STEP = 128


def prefetch_step(num_steps):
  """The step of a tile of num_steps (int32) that issues the prefetch."""
  return jnp.minimum(PREFETCH_STEP, num_steps - 1)


def operand_slot(t, num_tiles, slots: int, load, ready):
  """The slot of a consumer's own operands of local tile t (the forward's
  Q; the dK/dV kernel's K and V), which also stages the tile's outputs for
  their TMA store: so refilling a slot first waits until those stores have
  read it. With one slot, tile t's operands load here; with two, the
  returned `prefetch()` loads tile t + 1's into the other slot (issue it
  once, under one of this tile's wgmmas: at step `prefetch_step`).
  `load(t, slot)` issues the copies completing on barrier `ready(slot)`,
  which is awaited here.

  Returns (slot, prefetch), prefetch None with one slot."""
  slot = lax.rem(t, _i32(slots))

  def prefetch():
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if slots == 1:
      load(t, 0)
    else:
      pl.when(t + 1 < num_tiles)(lambda: load(t + 1, 1 - slot))

  if slots == 1:
    prefetch()
  plgpu.barrier_wait(ready(slot))
  return slot, (prefetch if slots > 1 else None)


def when(pred, fn):
  """fn() if pred: a Python bool decided now, or an int32/bool scalar
  (pl.when)."""
  if pred is True:
    fn()
  elif pred is not False:
    pl.when(pred)(fn)


def key_rows(ref, keys):
  """ref's rows [off, off + width) for keys = (off, width); all if None."""
  return ref if keys is None else ref.at[pl.ds(*keys)]


def both(a, b):
  """a and b, either a Python bool or a traced predicate."""
  if a is True or a is False:
    return b if a else False
  return jnp.logical_and(a, b)


def negate(a):
  """not a, for a Python bool or a traced predicate."""
  return (not a) if isinstance(a, bool) else jnp.logical_not(a)


def slot_of(i, stages: int):
  """The ring slot of pipeline step i (an int32 scalar)."""
  return lax.rem(i, jnp.asarray(stages, i.dtype))


def fill_ring(num_steps, stages: int, load, *, first=0):
  """The producer's loop: step i waits until its slot is free (from the
  second round on), then `load(i, slot, wait_free)` issues its copies;
  `wait_free()` must be called before each copy that overwrites a slot.
  `first`: how many steps earlier tiles of the CTA put through the ring
  (step i uses the slot of ring step first + i)."""

  @pl.loop(0, num_steps)
  def _(i):
    slot = slot_of(first + i, stages)

    def wait_free(barrier):
      @pl.when(first + i >= stages)
      def _():
        plgpu.barrier_wait(barrier.at[slot])

    load(i, slot, wait_free)


def visit_runs(bounds, loops: dict, step, carry, *, reverse: bool = False,
               run=None):
  """`step(block, carry, masked=...)` over the three runs of a
  `MaskRule.key_blocks` / `query_blocks` range, masked "leading", False
  (the middle run) and "trailing" (`tile_visible`'s `run`); `loops` says
  which runs can be non-empty (`MaskRule.key_loops` / `query_loops`).
  `reverse` visits the blocks from last to first. `run(loop, carry, first,
  last, n)`, if given, runs each run's `loop(carry)` (n steps from block
  `first` to block `last`), e.g. inside a scope of its own."""
  start, full_start, full_end, end = bounds
  runs = [(start, full_start, "leading", loops["leading"]),
          (full_start, full_end, False, loops["middle"]),
          (full_end, end, "trailing", loops["trailing"])]
  for lo, hi, masked, present in (runs[::-1] if reverse else runs):
    if not present:
      continue
    body = functools.partial(step, masked=masked)
    if reverse:
      loop = functools.partial(
          lax.fori_loop, 0, hi - lo,
          lambda t, c, hi=hi, body=body: body(hi - 1 - t, c))
      first, last = hi - 1, lo
    else:
      loop = functools.partial(lax.fori_loop, lo, hi, body)
      first, last = lo, hi - 1
    carry = loop(carry) if run is None else run(loop, carry, first, last,
                                                 hi - lo)
  return carry


def matmul_t(a, b, shape, during=None):
  """a @ b^T as a float32 array in the wgmma layout; a, b in shared memory
  (or a in registers), shape = (rows of a, rows of b). `during()`, if
  given, is issued while the wgmma runs."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b.T)
    if during is not None:
      during()
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def kv_ring_scratch(mask: MaskRule, block_k: int, stages: int, head_dim: int,
                    dtype, consumers: int = CONSUMERS,
                    cluster: int = 1) -> tuple:
  """(buffers, barriers) of a ring of K and V tiles (and key segment ids)
  that the consumers free once each: see `kv_producer`. With a cluster, a
  slot is free once the consumers of every CTA in it have freed it (a
  multicast refills it in all of them)."""
  swizzle = swizzle_for(block_k)
  buffers = dict(k=tile_smem((stages, block_k, head_dim), dtype, swizzle),
                 v=tile_smem((stages, block_k, head_dim), dtype, swizzle))
  if mask.has_segments:
    buffers["kv_seg"] = plgpu.SMEM((stages, block_k), jnp.int32)
  free = (functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",))
          if cluster > 1 else plgpu.Barrier)
  barriers = dict(
      k_ready=plgpu.Barrier(num_arrivals=2 if mask.has_segments else 1,
                            num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      k_free=free(num_arrivals=consumers, num_barriers=stages),
      v_free=free(num_arrivals=consumers, num_barriers=stages))
  return buffers, barriers


def kv_producer(refs, scratch, *, mask: MaskRule, block_q: int, block_k: int,
                stages: int, group: int, tiles: Tiles,
                consumers: int = CONSUMERS):
  """The TMA warpgroup of the query-major kernels (forward, dQ): K (with the
  key segment ids) and V of every key block each of the CTA's tiles (of
  consumers * block_q rows) visits,
  in order, into the ring of `kv_ring_scratch`; the ring runs on across
  tiles, so the next tile's first blocks load while this one finishes.
  In a cluster (`tiles.cluster`), the CTAs' copies are multicast, and
  before leaving the producer waits for the last frees of its slots, which
  the other CTA's consumers send too: no arrival may reach a CTA that has
  exited."""
  bars = scratch["bars"]
  multicast = tiles.cluster > 1

  def tile(t, coords, first):
    q_tile, head, batch = coords
    start, _, _, end = visited_runs(
        mask, refs.get("seg_range"), batch, q_tile, consumers * block_q,
        block_k, query_major=True)[0]
    kv_head = lax.div(head, _i32(group))

    def load(i, slot, wait_free):
      copy = functools.partial(
          copy_rows, refs, dst=lambda name: scratch[name].at[slot],
          batch=batch, rows=pl.ds((start + i) * block_k, block_k),
          head=kv_head, multicast=multicast)
      wait_free(bars["k_free"])
      copy(["k"] + (["kv_seg"] if mask.has_segments else []),
           barrier=bars["k_ready"].at[slot])
      wait_free(bars["v_free"])
      copy(["v"], barrier=bars["v_ready"].at[slot])

    fill_ring(end - start, stages, load, first=first)
    return first + end - start

  steps = tiles.loop(tile, _i32(0))
  if multicast:
    for j in range(stages):  # ring steps steps - stages .. steps - 1
      step = steps - stages + j

      @pl.when(step >= 0)
      def _():
        for name in ("k_free", "v_free"):
          plgpu.barrier_wait(bars[name].at[slot_of(step, stages)])


def named_refs(args, names):
  """(refs by name, the scratch tree) from a kernel's positional refs."""
  (scratch,) = args[len(names):]
  return dict(zip(names, args[:len(names)])), scratch


def warp_specialize(consumer, producer, consumers: int = CONSUMERS,
                    registers: tuple[int, int] | None = None):
  """Runs consumer(wg) on warpgroups 0..consumers-1 (registers raised) and
  producer() on the last one (registers lowered): registers (consumer,
  producer) per thread, `REGISTERS[consumers]` if None."""
  wg = lax.axis_index("wg")
  consumer_registers, producer_registers = (registers
                                            or REGISTERS[consumers])

  @pl.when(wg < consumers)
  def _():
    plgpu.set_max_registers(consumer_registers, action="increase")
    consumer(wg)

  @pl.when(wg == consumers)
  def _():
    plgpu.set_max_registers(producer_registers, action="decrease")
    producer()


def tile_costs(block_range, num_tiles: int) -> list:
  """The blocks each of `num_tiles` tiles visits (Python ints), from
  block_range(i), a `MaskRule.key_blocks` / `query_blocks` range (segment
  ids are not known when tracing: all of them)."""
  return [max(r[3] - r[0], 0) for r in map(block_range, range(num_tiles))]


def mean_at_most(costs, limit) -> bool:
  """Whether `tile_costs` average at most `limit` blocks per tile (the
  persistence and tail thresholds of the kernels)."""
  return sum(costs) <= limit * len(costs)


def query_major_kernel(args, names, consumer, *, mask: MaskRule,
                       blocks: MosaicBlocks, group: int, tiles: Tiles):
  """The body of a kernel parallel over query tiles (forward, dQ), grid
  (tiles.num_ctas,) named "cta": the consumers run
  consumer(wg, refs, scratch, tiles=tiles), each looping over the CTA's
  tiles (`Tiles.loop`), and the producer streams K and V
  (`kv_producer`). `names`: the refs in order."""
  refs, scratch = named_refs(args, names)
  tiles = tiles.bind(refs)
  warp_specialize(
      lambda wg: consumer(wg, refs, scratch, tiles=tiles),
      lambda: kv_producer(refs, scratch, mask=mask, block_q=blocks.block_q,
                          block_k=blocks.block_k, stages=blocks.stages,
                          group=group, tiles=tiles,
                          consumers=blocks.consumers),
      blocks.consumers)


def key_ring_step(first, bounds, kv_block):
  """The ring step of key block `kv_block` of a tile whose key range
  `bounds` starts at ring step `first` (see `kv_producer`)."""
  return first + kv_block - bounds[0]
