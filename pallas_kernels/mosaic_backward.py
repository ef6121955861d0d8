"""FlashAttention-2 backward (Algorithm 2) for Hopper, Pallas Mosaic GPU.

Two kernels, both deterministic (no atomics): each output tile is summed in
a fixed order.

* dK/dV: one CTA per (CONSUMERS * block_k_dkv keys, kv head, batch), or,
  persistent (`mt.Tiles`), one CTA per SM looping over its share, with the
  next tile's K and V loading into a second slot during this one. Each
  consumer warpgroup keeps 64 keys of K and V in shared memory and dK, dV in
  registers; the producer streams Q, dO, LSE and delta of every query head of
  the kv head's group (GQA sums inside the CTA) and every query block that
  sees the keys. Per step: S^T = K Q^T, P^T = exp(S^T - LSE),
  dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q,
  the last awaited only under the next step's S^T (the Q slot is freed
  there); under a window dP^T is issued before dV, so that dS is computed
  while dV runs. The dK/dV kernel walks its query blocks from last to
  first (`_Walk`).
* dQ: one CTA per (CONSUMERS * block_q rows, query head, batch), or,
  where the tiles are short, persistent (at head_dim 64 the next tile's Q
  and dO load during this one); each consumer keeps Q and dO, the producer
  streams K and V:
  S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K (P computed
  while dP's wgmma runs).
  It runs first: given O instead of delta, each consumer first computes
  its rows' delta = rowsum(dO O) from O and dO in shared memory and stores
  it for the dK/dV kernel (one pass over O and dO fewer than an XLA
  reduction; benchmarks/NOTES.md item 50).
* Or, with `MosaicBlocks(fused_dq=True)`, dQ inside the dK/dV kernel (FA2's
  5 matmuls instead of 7): the consumers pass dS^T through shared memory,
  each computes half of the partial dQ = dS K of the CTA's keys, and a
  warp of the producer (not the one that loads) TMA-adds it into a float32
  dQ in global memory. The key tiles that visit a query block add in tile
  order, counted by a global semaphore per (batch, head, query block):
  deterministic without atomics. The key tiles walk so that no two add
  into one block at the same step (`_Walk`): under a causal mask or window
  from first to last, each tile one block behind the next; where every
  key tile sees every query block, each starting at a different block. The
  default uses it at head_dim 64 where it was measured faster
  (`_fusing_pays`).

At head_dim 256 a consumer cannot hold both [64, 256] float32 tiles of dK
and dV: the dK/dV kernel runs twice, for dV and then for dK (`_launch_parts`),
and both kernels stream 32-row blocks (`mt.NARROW_FIELDS`) so that their
rings fit in shared memory.

With segment ids, each kernel visits only the blocks that can hold a
matching pair, and skips the element-wise mask on those whose queries and
keys all share one id (`mt.narrowed`; the fused dQ excepted). The LSE comes in as
base 2 (`scores.lse_log2`: +inf for rows that see no key and for padded
rows, so their P is 0).
"""
import copy
import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_tiles as mt
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import out_struct, row_delta
from pallas_kernels.scores import ScoreRule, lse_log2


def _probabilities(s_raw, lse2, *, mask, score, masked, shape, query_axis,
                   q_start, k_start, q_seg, kv_seg, one_sided):
  """(P, tanh term) of one tile from raw scores and base-2 LSE; `masked`:
  False or the tile's run, `one_sided` as in `mt.tile_visible`."""
  x, c, t = score.deferred_log2(s_raw)  # exp2(x * c - lse2): one FMA
  if masked:
    visible = mt.tile_visible(mask, shape, q_start, k_start,
                              query_axis=query_axis, q_seg=q_seg,
                              kv_seg=kv_seg, run=masked,
                              one_sided=one_sided)
    x = jnp.where(visible, x, -jnp.inf)
  x = x if c is None else x * c
  return jnp.exp2(x - mt.broadcast(lse2, shape, query_axis)), t


# ---------------------------------------------------------------- dK / dV

# What one launch of the dK/dV kernel computes (`_parts`): both, or, where a
# consumer's registers cannot hold both [block_k_dkv, H] float32 tiles
# (head_dim 256: 2 x 128 registers), dV in one launch and dK in a second that
# recomputes S (8 matmuls instead of 7 with the dQ kernel's).
DKDV, DV, DK = "dkdv", "dv", "dk"


def _parts(part: str) -> tuple:
  """The outputs of a dK/dV launch of `part`."""
  return {DKDV: ("dk", "dv"), DV: ("dv",), DK: ("dk",)}[part]


def _launch_parts(head_dim: int) -> tuple:
  """The dK/dV kernel's launches: one at head_dim <= 128, else DV then DK."""
  return (DKDV,) if head_dim <= 128 else (DV, DK)

# Ring depth of the fused kernel's float32 dQ tiles (consumers -> producer):
# the TMA add of one runs while the consumers compute the next.
DQ_STAGES = 2
# The producer warps of the fused kernel.
LOAD_WARP, ADD_WARP = 0, 1


# The default fuses dQ where every key tile sees every query block (the
# rotated walk, `_Walk`) only from this many steps per key tile on: at 1k
# (8 steps) the two persistent kernels were faster (H100, head_dim 64:
# 376-382 vs 354-356 TFLOP/s fwd+bwd; 2k: 395, 386 vs 411, 408;
# benchmarks/NOTES.md item 42). Under a band (the UP walk) likewise: 2k
# causal (8.5 steps) 342 vs 349, 1k 264 vs 283 (item 43).
MIN_FUSED_STEPS = 16
# Under a band the UP walk launches the key tiles shortest first, so the
# longest tile of the last head starts last: the default fuses only where
# it is short against an SM's share of all steps (the tail, `_up_tail`):
# causal at 4k-16k without GQA is 0.06 (+6-10% fused), 16k with 4 query
# heads per kv head 0.26 (-3%; benchmarks/NOTES.md item 43).
MAX_UP_TAIL = 0.125


def _up_tail(key_costs: list, copies: int) -> float:
  """The longest key tile's steps over an SM's share of the steps of all
  `copies` (kv heads x batch) of the key tiles."""
  return max(key_costs) * mt.num_sms() / max(sum(key_costs) * copies, 1)


def _fusing_pays(head_dim: int, mask: MaskRule, key_costs: list,
                 copies: int, rotatable: bool) -> bool:
  """Where the default (`fused_dq=None`) fuses dQ: where it was measured
  faster on an H100, all at head_dim 64 (at 128 fused was slower: 16k
  causal 432 vs 518 TFLOP/s fwd+bwd, unmasked level; benchmarks/NOTES.md
  items 35 and 43), never with segment ids (fused visits every block of
  their positions):
  - no mask cutting blocks, at least as many query blocks as key tiles
    (`rotatable`: the rotated walk) and MIN_FUSED_STEPS steps per key
    tile on average (H100, 4k: 429-432 vs 401-402 TFLOP/s fwd+bwd, 8k 453
    vs 406-408, 16k 462-466 vs 422-423; item 42), or more than
    MAX_PERSISTENT_STEPS (16k: 456 vs 415, item 19);
  - a causal mask or window (the UP walk) from MIN_FUSED_STEPS steps on
    average, with a tail (`_up_tail`) of at most MAX_UP_TAIL (16k causal
    454 vs 427, 8k 430 vs 393, 4k 403-405 vs 380-396; item 43)."""
  if head_dim != 64 or not mask.dense_blocks:
    return False
  mean_steps = sum(key_costs) / len(key_costs)
  if not mask.cuts_blocks:
    return mean_steps > MAX_PERSISTENT_STEPS or (
        rotatable and mean_steps >= MIN_FUSED_STEPS)
  return (mean_steps >= MIN_FUSED_STEPS
          and _up_tail(key_costs, copies) <= MAX_UP_TAIL)


def _dq_split(blocks: mt.MosaicBlocks, head_dim: int, mask: MaskRule,
              key_costs: list, copies: int, rotatable: bool,
              dtype=jnp.bfloat16) -> str | None:
  """How the consumers share the fused dQ tile [block_q_dkv, H]: "cols"
  (each computes H / 2 columns), "rows" (block_q_dkv / 2 rows), or None:
  the separate dQ kernel runs instead. None where neither half is a whole
  64-wide tile; at head_dim 256 (dS and dQ do not fit in shared memory);
  with `fused_dq=False`; and with `fused_dq=None` (the default) except
  where `_fusing_pays` (key_costs: each key tile's steps; copies: kv heads
  x batch) and the fused kernel fits in shared memory (not with 3 stages at
  head_dim 64; `fused_dq=True` raises there instead)."""
  if blocks.fused_dq is False or head_dim > 128:
    return None
  if blocks.fused_dq is None and not _fusing_pays(head_dim, mask, key_costs,
                                                  copies, rotatable):
    return None
  split = None
  if head_dim >= 2 * 64:
    split = "cols"
  elif blocks.block_q_dkv >= 2 * 64:
    split = "rows"
  if split and blocks.fused_dq is None:
    scratch = _dkdv_scratch(mask, blocks, head_dim, dtype, split, 1)
    if not mt.fits_smem(scratch):
      return None
  return split


def _query_blocks(mask: MaskRule, refs, k_tile, batch, block_q: int,
                  block_k: int, split):
  """(bounds, loops) of the query blocks that key tile k_tile visits
  (`mt.visited_runs`); with segment ids only those that can hold a
  matching pair, except with the fused dQ, whose add order counts every
  key tile that a query block's positions see."""
  return mt.visited_runs(mask, None if split else refs.get("seg_range"),
                         batch, k_tile, block_q, block_k, query_major=False)


def _rotatable(mask: MaskRule, num_q_blocks: int, num_k_tiles: int) -> bool:
  """Whether a fused dQ would walk rotated (`_Walk`): every key tile visits
  every query block unmasked, and there are at least as many query blocks
  as key tiles (so that the tiles start at different blocks)."""
  return not mask.cuts_blocks and num_q_blocks >= num_k_tiles


# The orders in which a key tile of the dK/dV kernel walks its query blocks
# (`_Walk`): from last to first (the separate dQ kernel: no adds to order);
# with the fused dQ, rotated (`_rotatable`) or else from first to last.
DOWN, ROTATED, UP = "down", "rotated", "up"


def _walk_order(mask: MaskRule, split, num_q_blocks: int,
                num_k_tiles: int) -> str:
  """How the dK/dV kernel's key tiles walk their query blocks (`_Walk`)."""
  if split is None:
    return DOWN
  return ROTATED if _rotatable(mask, num_q_blocks, num_k_tiles) else UP


@dataclasses.dataclass(frozen=True)
class _Walk:
  """The order in which key tile `k_tile` visits its num_q query blocks
  [start, end), per group head, and, with the fused dQ, the order in which
  the key tiles that visit a query block add their dQ tiles into it
  (`add_order`). A tile may only wait for tiles launched before it (the
  CTAs launch in `mt.Tiles` order), and should find their adds done, so
  that it does not wait at all:
  - DOWN: from last to first (the separate dQ kernel).
  - UP: from first to last; block b gets its tiles from the last one down,
    and the tiles launch last first (`Tiles(last_first=True)`). Under a
    causal mask or window the key tiles start one or two blocks apart, so
    at each step they are at different blocks and each reaches block b a
    step or two after the tile before it in b's order. (Without a mask
    and T < S, not rotatable, all start at block 0 and the adds of a step
    follow each other.)
  - ROTATED (`_rotatable`: every key tile visits every block): key tile j
    starts at block j and walks down from there, wrapping around. Block b
    gets tiles b, b+1, ... at steps 0, 1, ... into one float32 sum and
    tiles 0..b-1 at later steps, in the same order, into a second
    (benchmarks/NOTES.md items 42 and 43)."""
  num_q: object
  start: object
  end: object
  k_tile: object
  order: str

  def _shift(self):
    return self.num_q - 1 - self.k_tile

  def block(self, s):
    """The query block of step s within a group head."""
    if self.order == UP:
      return self.start + s
    if self.order == ROTATED:
      s = lax.rem(s + self._shift(), self.num_q)
    return self.end - 1 - s

  def step(self, g, q_block):
    """The pipeline step of (group head g, query block): `block`'s inverse."""
    if self.order == UP:
      return g * self.num_q + q_block - self.start
    s = self.end - 1 - q_block
    if self.order == ROTATED:
      s = lax.rem(s - self._shift() + self.num_q, self.num_q)
    return g * self.num_q + s

  def add_order(self, q_block, last_k_tile=None):
    """(sum, rank): which float32 dQ sum this key tile adds query block
    q_block into, and its place in that sum's order (the tiles before it
    add first; rank 0 stores). UP: into sum 0 from `last_k_tile` (the last
    key tile that visits the block) down. ROTATED: tiles q_block.. (which
    reach it at steps 0, 1, ...) into sum 0 and tiles 0..q_block - 1 (at
    later steps, in the same order) into sum 1. Sum 0 stays empty in
    blocks past the last key tile, sum 1 in block 0 (`_finish_dq`)."""
    if self.order == UP:
      return 0, last_k_tile - self.k_tile
    assert self.order == ROTATED, self.order
    before = jnp.asarray(self.k_tile < q_block)
    return (before.astype(jnp.int32),
            jnp.where(before, self.k_tile, self.k_tile - q_block))


def _dkdv_consumer(wg, refs, scratch, *, mask, score, blocks, group: int,
                   tiles: mt.Tiles, split, order: str, part: str):
  """One consumer warpgroup: keys [k_tile * 2 bk + wg * bk, + bk) of each of
  the CTA's key tiles, with dK and dV (`part` DKDV), or one of them (DV,
  DK: `_parts`), in registers."""
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.stages
  bars = scratch["bars"]
  dtype = refs["k"].dtype
  kv_slots = scratch["k"].shape[0]
  cta = lax.axis_index("cta")
  num_tiles = tiles.count(cta)
  one_sided = mask.one_sided_runs(bq, mt.CONSUMERS * bk, query_major=False)

  def load_kv(t, slot):  # K and V (and key segment ids) of local tile t
    mt.load_own(refs, scratch,
                ["k", "v"] + (["kv_seg"] if mask.has_segments else []),
                bars["kv"], tiles=tiles, cta=cta, t=t, wg=wg, slot=slot,
                block=bk)

  def tile(t, coords, first):
    k_tile, kv_head, batch = coords
    bounds, loops = _query_blocks(mask, refs, k_tile, batch, bq,
                                  mt.CONSUMERS * bk, split)
    num_q = bounds[3] - bounds[0]
    walk = _Walk(num_q, bounds[0], bounds[3], k_tile, order)
    key0 = mt.own_rows(k_tile, wg, bk)[0]
    kv_slot, next_kv = mt.operand_slot(
        t, num_tiles, kv_slots, load_kv,
        lambda slot: mt.own_slot(bars["kv"], slot, wg))
    k_smem, v_smem = scratch["k"].at[kv_slot, wg], scratch["v"].at[kv_slot, wg]
    kv_seg = (mt.load_vector(scratch["kv_seg"].at[kv_slot, wg], axis=0)
              if mask.has_segments else None)
    hp = k_smem.shape[-1]

    # Unless the step also computes dQ (`split`), its dK wgmma is awaited
    # under the next step's S^T (benchmarks/NOTES.md item 64): dK and dV
    # then live in accumulator refs for the length of each run of steps.
    defer = not split and "dk" in _parts(part)
    scope = {}  # where `defer`: the run's accumulator refs and first step

    def head_loop(g, carry):
      def step(q_block, carry, *, masked):
        dk, dv = carry  # None where `part` leaves it out
        i = walk.step(g, q_block)
        slot = mt.slot_of(first + i, stages)
        q_smem, do_smem = scratch["q"].at[slot], scratch["do"].at[slot]
        plgpu.barrier_wait(bars["q_ready"].at[slot])

        # S^T = K Q^T; the next tile's K and V load under the first one.
        prefetch = (lambda: pl.when(
            i == mt.prefetch_step(group * num_q))(next_kv)) if next_kv else None
        s = mt.matmul_t(k_smem, q_smem, (bk, bq), during=prefetch)
        if defer:  # so the previous step's dK wgmma has read its Q
          pl.when(i > scope["first"])(lambda: plgpu.barrier_arrive(
              bars["free"].at[mt.slot_of(first + i - 1, stages)]))
        q_seg = (mt.load_vector(scratch["q_seg"].at[slot], axis=1)
                 if mask.has_segments and masked else None)
        lse2 = mt.load_vector(scratch["lse"].at[slot], axis=1)
        p, t_cap = _probabilities(s, lse2, mask=mask, score=score,
                                  masked=masked, shape=(bk, bq), query_axis=1,
                                  q_start=q_block * bq, k_start=key0,
                                  q_seg=q_seg, kv_seg=kv_seg,
                                  one_sided=one_sided)
        plgpu.barrier_wait(bars["do_ready"].at[slot])

        def dv_dp(refs_):  # dV += P^T dO, dP^T = V dO^T: what `part` needs
          dv_ref, dp_ref = refs_
          if dv_ref is not None:
            plgpu.wgmma(dv_ref, p.astype(dtype), do_smem)
          if dp_ref is not None:
            plgpu.wgmma(dp_ref, v_smem, do_smem.T)

        if defer:  # dV in the run's scope; dP^T awaited here
          dk_ref, dv_ref = scope["refs"]

          def dv_then_dp(dp_ref):
            dv_dp((dv_ref, dp_ref))
            return dp_ref[...]

          def dp_then_dv(dp_ref):  # dS is then computed while dV runs
            dv_dp((None, dp_ref))
            dv_dp((dv_ref, None))
            return plgpu.wgmma_accumulator_load(
                dp_ref, wait_n=0 if dv_ref is None else 1)

          # dP^T first pays on a window's short runs of steps, and costs
          # registers (spills) on long ones (benchmarks/NOTES.md item 65).
          dp = pl.run_scoped(
              dp_then_dv if mask.key_span is not None else dv_then_dp,
              plgpu.ACC((bk, bq), jnp.float32))
        else:
          dv, dp = pl.run_state(dv_dp)((
              None if dv is None else plgpu.ACC.init(dv),
              None if dk is None else plgpu.ACC.init(mt.wgmma_zeros((bk, bq)))))
          if dk is None:  # DV: neither dS nor dK
            plgpu.barrier_arrive(bars["free"].at[slot])
            return dk, dv
        delta = mt.load_vector(scratch["delta"].at[slot], axis=1)
        ds = score.through_cap(p * (dp - mt.broadcast(delta, (bk, bq), 1)),
                               t_cap).astype(dtype)
        if split:  # dS^T to shared memory, for the dQ matmul of both halves
          @pl.when(i > 0)  # both consumers' last dQ matmuls have read it
          def _():
            plgpu.barrier_wait(bars["ds_free"])
          scratch["ds"].at[wg][...] = ds
          plgpu.commit_smem()
          plgpu.barrier_arrive(bars["ds_ready"])
        if defer:  # awaited under the next step's S^T, or at the run's end
          plgpu.wgmma(dk_ref, ds, q_smem)
          return carry

        def dk_acc(acc_ref):
          plgpu.wgmma(acc_ref, ds, q_smem)

        dk = pl.run_state(dk_acc)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(bars["free"].at[slot])
        if split:
          _dq_tile(wg, i, scratch, split=split, bq=bq, hp=hp)
        return dk, dv

      def run(loop, carry, first_block, last_block, n):
        """One run of steps, with dK and dV in accumulator refs where
        `defer`: its last dK wgmma is awaited at its end."""
        if not defer:
          return loop(carry)

        def in_scope(refs):
          scope["refs"] = refs
          scope["first"] = walk.step(g, first_block)
          loop((None, None))  # dK and dV are in `refs`
        carry = pl.run_state(in_scope)(tuple(
            None if x is None else plgpu.ACC.init(x) for x in carry))

        @pl.when(n > 0)
        def _():
          plgpu.barrier_arrive(bars["free"].at[mt.slot_of(
              first + walk.step(g, last_block), stages)])
        return carry

      if order == ROTATED:  # one unmasked run
        return run(functools.partial(
            lax.fori_loop, 0, num_q,
            lambda s, c: step(walk.block(s), c, masked=False)),
            carry, walk.block(0), walk.block(num_q - 1), num_q)
      return mt.visit_runs(bounds, loops, step, carry,
                           reverse=order == DOWN, run=run)

    zeros = mt.wgmma_zeros((bk, hp))
    dk, dv = lax.fori_loop(0, group, head_loop, tuple(
        zeros if name in _parts(part) else None for name in ("dk", "dv")))
    if next_kv:
      pl.when(num_q == 0)(next_kv)  # a tile with no step
    if split:  # the other consumer's last dQ matmul may still read our K
      plgpu.barrier_arrive(bars["k_read"])
      plgpu.barrier_wait(bars["k_read"])
    staged = []  # dK and dV are staged in the K and V slot
    if dk is not None:
      k_smem[...] = (dk * score.scale).astype(dtype)
      staged.append(("dk", k_smem))
    if dv is not None:
      v_smem[...] = dv.astype(dtype)
      staged.append(("dv", v_smem))
    plgpu.commit_smem()
    keys = mt.own_rows(k_tile, wg, bk)[1]
    for name, ref in staged:
      plgpu.copy_smem_to_gmem(ref, refs[name].at[batch, keys, kv_head])
    return first + group * num_q

  if kv_slots > 1:
    pl.when(num_tiles > 0)(lambda: load_kv(0, 0))
  tiles.loop(tile, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def _dq_half(h, split: str, bq: int, hp: int):
  """The columns (split "cols") or rows ("rows") of the dQ tile that
  consumer h computes."""
  size = (hp if split == "cols" else bq) // mt.CONSUMERS
  return pl.ds(h * size, size)


def _dq_tile(wg, i, scratch, *, split: str, bq: int, hp: int):
  """Consumer `wg`'s half of step i's partial dQ = dS K over the CTA's keys
  (both consumers' dS^T, from shared memory), into the ring of dQ tiles
  that the producer adds to global memory."""
  bars = scratch["bars"]
  plgpu.barrier_wait(bars["ds_ready"])
  slot = mt.slot_of(i, DQ_STAGES)

  @pl.when(i >= DQ_STAGES)  # the producer has read this slot's last tile
  def _():
    plgpu.barrier_wait(bars["dq_free"].at[slot])

  ds = scratch["ds"]
  k = scratch["k"].at[0]  # one K/V slot: the fused dQ is never persistent
  half = _dq_half(wg, split, bq, hp)
  if split == "cols":
    operands = lambda w: (ds.at[w].T, k.at[w].at[:, half])
  else:
    operands = lambda w: (ds.at[w].at[:, half].T, k.at[w])

  def dq_acc(acc_ref):
    for w in range(mt.CONSUMERS):
      plgpu.wgmma(acc_ref, *operands(w))
    return acc_ref[...]

  tile = pl.run_scoped(dq_acc, plgpu.ACC(scratch["dq"].shape[1:],
                                         jnp.float32))
  plgpu.barrier_arrive(bars["ds_free"])
  scratch["dq"].at[slot * mt.CONSUMERS + wg][...] = tile
  plgpu.commit_smem()
  plgpu.barrier_arrive(bars["dq_ready"].at[slot])


def _dkdv_producer(refs, scratch, sems, *, mask, blocks, group: int,
                   tiles: mt.Tiles, split, order: str):
  """The TMA warpgroup: Q, LSE (and segment ids), dO and delta of every
  step of each of the CTA's key tiles into the ring, which runs on across
  tiles; with the fused dQ, also the ordered adds of the dQ tiles."""
  bq, stages = blocks.block_q_dkv, blocks.stages
  bars = scratch["bars"]

  def tile(t, coords, first):
    k_tile, kv_head, batch = coords
    bounds = _query_blocks(mask, refs, k_tile, batch, bq,
                           mt.CONSUMERS * blocks.block_k_dkv, split)[0]
    num_q = bounds[3] - bounds[0]
    divisor = jnp.maximum(num_q, 1)
    walk = _Walk(divisor, bounds[0], bounds[3], k_tile, order)

    def head_and_rows(i):  # the inverse of walk.step
      g = lax.div(i, divisor)
      return kv_head * group + g, walk.block(lax.rem(i, divisor))

    def load(i, slot, wait_free):
      head, q_block = head_and_rows(i)
      copy = functools.partial(
          mt.copy_rows, refs, dst=lambda name: scratch[name].at[slot],
          batch=batch, rows=pl.ds(q_block * bq, bq), head=head)
      wait_free(bars["free"])
      copy(["q", "lse"] + (["q_seg"] if mask.has_segments else []),
           barrier=bars["q_ready"].at[slot])
      copy(["do", "delta"], barrier=bars["do_ready"].at[slot])

    num_steps = group * num_q
    if split:  # one tile per CTA
      _fused_dq_producer(refs, scratch, sems, load, head_and_rows,
                         num_steps, mask=mask, blocks=blocks, split=split,
                         walk=walk, batch=batch)
    else:
      mt.fill_ring(num_steps, stages, load, first=first)
    return first + num_steps

  tiles.loop(tile, jnp.int32(0))


def _fused_dq_producer(refs, scratch, sems, load, head_and_rows, num_steps,
                       *, mask, blocks, split, walk: "_Walk", batch):
  """The producer with the fused dQ: one warp loads the ring, another adds
  each step's dQ tile into global memory in key-tile order."""
  bq, stages = blocks.block_q_dkv, blocks.stages
  bars = scratch["bars"]
  _, num_batch, rows, num_heads, _ = refs["dq"].shape
  num_q_blocks = rows // bq

  def semaphore(head, q_block):
    """(the float32 sum, the counter of (sum, batch, head, query block), our
    rank in its order: `_Walk.add_order`)."""
    last = None if walk.order == ROTATED else mask.key_blocks(
        q_block, bq, mt.CONSUMERS * blocks.block_k_dkv)[3] - 1
    part, rank = walk.add_order(q_block, last)
    index = ((part * num_batch + batch) * num_heads
             + head) * num_q_blocks + q_block
    return refs["dq"].at[part, batch], sems.at[index], rank

  def add_dq(i):
    """Adds step i's dQ tile into the float32 dQ once the key tiles before
    ours have (the first stores it), frees its ring slot as soon as the TMA
    has read it, and signals the next key tile once the sum has landed."""
    head, q_block = head_and_rows(i)
    dq_sum, sem, rank = semaphore(head, q_block)
    slot = mt.slot_of(i, DQ_STAGES)
    plgpu.barrier_wait(bars["dq_ready"].at[slot])
    plgpu.semaphore_wait(sem, rank, decrement=False, memory_scope="gpu")
    for h in range(mt.CONSUMERS):
      src = scratch["dq"].at[slot * mt.CONSUMERS + h]
      dst = dq_sum.at[pl.ds(q_block * bq, bq), head]
      half = _dq_half(h, split, bq, dst.shape[-1])
      dst = dst.at[:, half] if split == "cols" else dst.at[half, :]
      plgpu.copy_smem_to_gmem(src, dst, predicate=rank == 0,
                              commit_group=False)
      plgpu.copy_smem_to_gmem(src, dst, predicate=rank > 0,
                              reduction_op="add", commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_arrive(bars["dq_free"].at[slot])
    plgpu.wait_smem_to_gmem(0)
    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

  # Two warps of the producer: one loads the ring, the other adds, so that
  # no load waits on another CTA's semaphore.
  @plgpu.warp_map
  def _(warp):
    pl.when(warp == LOAD_WARP)(lambda: mt.fill_ring(num_steps, stages, load))
    pl.when(warp == ADD_WARP)(lambda: pl.loop(0, num_steps)(add_dq))


def _dkdv_kernel(*args, mask, score, blocks, group: int, split,
                 order: str, num_sems: int, tiles: mt.Tiles, part: str):
  names = ["q", "k", "v", "do", "lse", "delta"]
  names += ["q_seg", "kv_seg"] if mask.has_segments else []
  # The fused dQ visits every block of the position range (_query_blocks).
  names += ["seg_range"] if mask.has_segments and not split else []
  names += tiles.input_names()
  outs = list(_parts(part)) + (["dq"] if split else [])
  refs, scratch = mt.named_refs(args, names + outs)
  tiles = tiles.bind(refs)
  sems = (pl.get_global(plgpu.SemaphoreType.REGULAR((num_sems,)))
          if split else None)
  common = dict(mask=mask, blocks=blocks, group=group, split=split,
                tiles=tiles, order=order)
  mt.warp_specialize(
      lambda wg: _dkdv_consumer(wg, refs, scratch, score=score, part=part,
                                **common),
      lambda: _dkdv_producer(refs, scratch, sems, **common),
      registers=_dkdv_registers(mask, part))


def _dkdv_registers(mask, part: str) -> tuple[int, int] | None:
  """(consumer, producer) registers per thread of the dK/dV kernel (its
  `mt.CONSUMERS` = 2 consumers), None for `mt.REGISTERS`. Launches of both
  dK and dV (head_dim <= 128) that are not causal, or are windowed, take
  `mt.REGISTERS_LEAN_PRODUCER`: it cuts their consumers' spills and times
  their backward 1-3% faster on an H100 (unmasked and 1k windows). Plain
  causal ones measured up to 3% slower with it (benchmarks/NOTES.md item
  66); head_dim 256's split launches level, and 1% faster only under a
  causal mask, not worth a rule (item 67)."""
  if part == DKDV and (mask.key_span is not None or not mask.is_causal):
    return mt.REGISTERS_LEAN_PRODUCER
  return None


# The dK/dV kernel runs persistent only where its key tiles average at
# most this many steps: longer ones amortize a CTA's fixed cost anyway (16k
# at head_dim 128, 256 steps: 481 TFLOP/s persistent vs 491 one CTA per
# tile on an H100; benchmarks/NOTES.md item 17).
MAX_PERSISTENT_STEPS = 64
# The share of a persistent dK/dV kernel's tiles that run one per CTA after
# the persistent CTAs (`schedule.with_tail`), taken by the SMs that finish
# first: a static schedule waits on the slowest SMs (6% past the mean under
# a 1k window at head_dim 64 on an H100). dK/dV under that window, CUPTI:
# 569-574 us with none, 560 with 2%, 551-553 with 3%, 536-546 with 5%,
# 549-557 with 10%, 550-552 with 15% (benchmarks/NOTES.md item 61).
DKDV_TAIL_FRACTION = 0.05
# ... where the key tiles average at most this many steps (the window's 9;
# tiles as short as 1k tokens' or packed documents' too). Longer ones, as at
# 4k head_dim 128 (64 steps, ~8 tiles per SM), were not measured with it.
MAX_TAIL_STEPS = 16
# The dQ kernel runs persistent (`mt.Tiles`; at head_dim 64 with the next
# tile's Q and dO loading during this one) where its query tiles average
# at most this many key blocks: 1k tokens, windows, packed documents (H100,
# fwd+bwd: 1k causal head_dim 64 296-298 vs 280-285 TFLOP/s, 128 354-355
# vs 348; a 1k window at 16k 1.457-1.462 vs 1.485-1.492 ms; unmasked 1k
# level; benchmarks/NOTES.md item 44).
MAX_PERSISTENT_DQ_STEPS = 16


def _tail_fraction(key_costs: list) -> float:
  """The dK/dV launch's single-item tail (`DKDV_TAIL_FRACTION` where its
  key tiles average at most `MAX_TAIL_STEPS` steps, else none)."""
  return (DKDV_TAIL_FRACTION if mt.mean_at_most(key_costs, MAX_TAIL_STEPS)
          else 0.0)


def _key_tile_costs(mask: MaskRule, num_k_tiles: int,
                    blocks: mt.MosaicBlocks, group: int) -> list:
  """The steps (query blocks, over the group's heads) of each key tile of
  the dK/dV kernel (Python ints)."""
  costs = mt.tile_costs(
      lambda i: mask.query_blocks(i, blocks.block_q_dkv,
                                  mt.CONSUMERS * blocks.block_k_dkv),
      num_k_tiles)
  return [group * c for c in costs]


def _dkdv_scratch(mask, blocks, hp: int, dtype, split, kv_slots: int):
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.stages
  segs = 1 if mask.has_segments else 0
  # dV and dK contract over bq queries; K and V meet Q and dO in S^T and
  # dP^T, so all four take that swizzle.
  swizzle = mt.swizzle_for(bq)
  scratch = dict(
      k=mt.tile_smem((kv_slots, mt.CONSUMERS, bk, hp), dtype, swizzle),
      v=mt.tile_smem((kv_slots, mt.CONSUMERS, bk, hp), dtype, swizzle),
      q=mt.tile_smem((stages, bq, hp), dtype, swizzle),
      do=mt.tile_smem((stages, bq, hp), dtype, swizzle),
      lse=plgpu.SMEM((stages, bq), jnp.float32),
      delta=plgpu.SMEM((stages, bq), jnp.float32),
      bars=dict(
          kv=plgpu.Barrier(num_arrivals=2 + segs,
                           num_barriers=kv_slots * mt.CONSUMERS),
          q_ready=plgpu.Barrier(num_arrivals=2 + segs, num_barriers=stages),
          do_ready=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          free=plgpu.Barrier(num_arrivals=mt.CONSUMERS,
                             num_barriers=stages)))
  if mask.has_segments:
    scratch["kv_seg"] = plgpu.SMEM((kv_slots, mt.CONSUMERS, bk), jnp.int32)
    scratch["q_seg"] = plgpu.SMEM((stages, bq), jnp.int32)
  if split:
    scratch["ds"] = mt.tile_smem((mt.CONSUMERS, bk, bq), dtype)
    half = ((bq, hp // mt.CONSUMERS) if split == "cols"
            else (bq // mt.CONSUMERS, hp))
    # Consumer c's half of ring slot i is tile i * CONSUMERS + c.
    scratch["dq"] = mt.tile_smem((DQ_STAGES * mt.CONSUMERS, *half),
                                 jnp.float32)
    scratch["bars"].update(
        ds_ready=plgpu.Barrier(num_arrivals=mt.CONSUMERS),
        ds_free=plgpu.Barrier(num_arrivals=mt.CONSUMERS),
        dq_ready=plgpu.Barrier(num_arrivals=mt.CONSUMERS,
                               num_barriers=DQ_STAGES),
        dq_free=plgpu.Barrier(num_barriers=DQ_STAGES),
        k_read=plgpu.Barrier(num_arrivals=mt.CONSUMERS))
  return scratch


# ---------------------------------------------------------------- dQ

def _dq_consumer(wg, refs, scratch, *, mask, score, blocks, tiles):
  """One consumer warpgroup: rows [q_tile * 2 bq + wg * bq, + bq) of each
  of the CTA's query tiles, with Q and dO in shared memory and dQ in
  registers; with two operand slots, the next tile's Q, dO, LSE and delta
  load during this one."""
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.stages
  bars = scratch["bars"]
  dtype = refs["q"].dtype
  q_slots = scratch["q"].shape[0]
  cta = lax.axis_index("cta")
  num_tiles = tiles.count(cta)
  one_sided = mask.one_sided_runs(mt.CONSUMERS * bq, bk, query_major=True)

  in_kernel = "o" in scratch  # delta = rowsum(dO O) computed here

  def load_q(t, slot):  # Q, dO and their statistics (or O) of local tile t
    mt.load_own(refs, scratch, ["q", "do", "lse", "o" if in_kernel else
                                "delta"]
                + (["q_seg"] if mask.has_segments else []), bars["q"],
                tiles=tiles, cta=cta, t=t, wg=wg, slot=slot, block=bq)

  def tile(t, coords, first):
    q_tile, head, batch = coords
    bounds, loops = mt.visited_runs(mask, refs.get("seg_range"), batch,
                                    q_tile, mt.CONSUMERS * bq, bk,
                                    query_major=True)
    row0, rows = mt.own_rows(q_tile, wg, bq)
    # dQ is staged in the Q slot.
    q_slot, next_q = mt.operand_slot(
        t, num_tiles, q_slots, load_q,
        lambda slot: mt.own_slot(bars["q"], slot, wg))
    q_smem, do_smem = (scratch[name].at[q_slot, wg] for name in ("q", "do"))
    vector = lambda name: mt.load_vector(scratch[name].at[q_slot, wg],
                                         axis=0)
    lse2 = vector("lse")
    if in_kernel:  # delta of the tile's rows, stored for the dK/dV kernel
      delta_smem = scratch["delta"].at[q_slot, wg]
      delta = _row_delta(scratch["o"].at[q_slot, wg], do_smem)
      delta_smem[...] = delta
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(delta_smem, refs["delta"].at[batch, head, rows])
    else:
      delta = vector("delta")
    q_seg = vector("q_seg") if mask.has_segments else None
    num_blocks = bounds[3] - bounds[0]

    def step(kv_block, dq, *, masked):
      slot = mt.slot_of(mt.key_ring_step(first, bounds, kv_block), stages)
      k_smem, v_smem = scratch["k"].at[slot], scratch["v"].at[slot]
      plgpu.barrier_wait(bars["k_ready"].at[slot])
      plgpu.barrier_wait(bars["v_ready"].at[slot])

      def s_p_dp(s_ref, dp_ref):
        """S = Q K^T and dP = dO V^T issued back to back, and P computed
        from S while dP's wgmma runs (benchmarks/NOTES.md item 63)."""
        plgpu.wgmma(s_ref, q_smem, k_smem.T)
        plgpu.wgmma(dp_ref, do_smem, v_smem.T)
        if next_q:  # the next tile's Q and dO load under this tile
          pl.when(kv_block == bounds[0] + mt.prefetch_step(num_blocks))(
              next_q)
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # dP may still run
        kv_seg = (mt.load_vector(scratch["kv_seg"].at[slot], axis=1)
                  if mask.has_segments and masked else None)
        p, t = _probabilities(s, lse2, mask=mask, score=score, masked=masked,
                              shape=(bq, bk), query_axis=0, q_start=row0,
                              k_start=kv_block * bk, q_seg=q_seg,
                              kv_seg=kv_seg, one_sided=one_sided)
        return p, t, dp_ref[...]

      p, t, dp = pl.run_scoped(s_p_dp, plgpu.ACC((bq, bk), jnp.float32),
                               plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(bars["v_free"].at[slot])
      ds = score.through_cap(p * (dp - mt.broadcast(delta, (bq, bk), 0)),
                             t).astype(dtype)

      def dq_acc(acc_ref):
        plgpu.wgmma(acc_ref, ds, k_smem)

      dq = pl.run_state(dq_acc)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(bars["k_free"].at[slot])
      return dq

    dq = mt.visit_runs(bounds, loops, step,
                       mt.wgmma_zeros((bq, q_smem.shape[-1])))
    if next_q:
      pl.when(num_blocks == 0)(next_q)  # a tile with no step
    q_smem[...] = (dq * score.scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, refs["dq"].at[batch, rows, head])
    return first + num_blocks

  if q_slots > 1:
    pl.when(num_tiles > 0)(lambda: load_q(0, 0))
  tiles.loop(tile, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def _row_delta(o_smem, do_smem):
  """delta = rowsum(dO O) in float32 of one consumer's [bq, H] tiles of O
  and dO in shared memory: [bq], laid out one value per row of a wgmma
  tile (as `mt.load_vector(..., axis=0)`)."""
  o, do = (plgpu.load(ref, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
           for ref in (o_smem, do_smem))
  return (o * do).sum(axis=1)


def _dq_kernel(*args, mask, score, blocks, group: int, tiles,
               in_kernel: bool):
  """in_kernel: the kernel takes O (not delta) and also returns delta."""
  names = ["q", "k", "v", "do", "lse", "o" if in_kernel else "delta"]
  names += ["q_seg", "kv_seg", "seg_range"] if mask.has_segments else []
  names += tiles.input_names()
  mt.query_major_kernel(
      args, names + ["dq"] + (["delta"] if in_kernel else []),
      functools.partial(_dq_consumer, mask=mask, score=score, blocks=blocks),
      mask=mask, blocks=blocks, group=group, tiles=tiles)


def _dq_tiles(mask: MaskRule, blocks: mt.MosaicBlocks, num_q_tiles: int,
              num_heads: int, batch: int) -> mt.Tiles:
  """The dQ kernel's CTAs: persistent where its query tiles average at
  most MAX_PERSISTENT_DQ_STEPS key blocks (and `Tiles.make` balances them),
  else one per tile."""
  costs = mt.tile_costs(
      lambda i: mask.key_blocks(i, mt.CONSUMERS * blocks.block_q,
                                blocks.block_k_dq), num_q_tiles)
  return mt.Tiles.make(
      costs, num_heads, batch,
      persistent=(blocks.persistent
                  and mt.mean_at_most(costs, MAX_PERSISTENT_DQ_STEPS)))


def _dq_scratch(mask, blocks, hp: int, dtype, q_slots: int,
                in_kernel: bool):
  """in_kernel: O in each slot beside Q and dO (delta computed here)."""
  bq = blocks.block_q
  segs = 1 if mask.has_segments else 0
  ring, ring_bars = mt.kv_ring_scratch(mask, blocks.block_k, blocks.stages,
                                       hp, dtype)
  rows = (q_slots, mt.CONSUMERS, bq)
  # dQ contracts over the ring's keys (`kv_ring_scratch` takes this
  # swizzle); Q and dO meet K and V in S and dP, so they take it too.
  swizzle = mt.swizzle_for(blocks.block_k)
  scratch = dict(
      q=mt.tile_smem((*rows, hp), dtype, swizzle),
      do=mt.tile_smem((*rows, hp), dtype, swizzle),
      lse=plgpu.SMEM(rows, jnp.float32),
      delta=plgpu.SMEM(rows, jnp.float32), **ring,
      bars=dict(q=plgpu.Barrier(num_arrivals=4 + segs,
                                num_barriers=q_slots * mt.CONSUMERS),
                **ring_bars))
  if mask.has_segments:
    scratch["q_seg"] = plgpu.SMEM(rows, jnp.int32)
  if in_kernel:
    scratch["o"] = mt.tile_smem((*rows, hp), dtype, swizzle)
  return scratch


def _dq_kernel_blocks(blocks: mt.MosaicBlocks) -> mt.MosaicBlocks:
  """The tiles the query-major machinery (`mt.query_major_kernel`) reads for
  the dQ kernel: its keys per step as `block_k` and its 2 consumers
  (`consumers` is the forward's). Not validated again: block_k_dq may be 32,
  which no forward takes."""
  dq_blocks = copy.copy(blocks)
  object.__setattr__(dq_blocks, "block_k", blocks.block_k_dq)
  object.__setattr__(dq_blocks, "consumers", mt.CONSUMERS)
  return dq_blocks


# ---------------------------------------------------------------- wrapper

def backward(q, k, v, do, lse, delta, segments=None, *, mask: MaskRule,
             score: ScoreRule, blocks: mt.MosaicBlocks, out=None):
  """FlashAttention-2 backward on Hopper: dQ, dK, dV.

  Args:
    q, do: [B, T, N, H]; k, v: [B, S, K, H] (float16 or bfloat16), H <=
      256;
    lse, delta: [B, N, T] float32, lse in natural log, delta = rowsum(dO O);
      or delta None and `out` [B, T, N, H], the forward's O: the dQ kernel
      then computes delta (where it runs, and O fits in its shared memory;
      else one XLA fusion here), so that O and dO are read once fewer.
    segments, mask, score, blocks: as in `mosaic_forward.forward`.
  Returns:
    dq [B, T, N, H], dk and dv [B, S, K, H], in the inputs' dtype.
  """
  if (delta is None) == (out is None):
    raise ValueError("backward takes delta or out, exactly one of them; got "
                     f"delta={_shape(delta)}, out={_shape(out)}")
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  hp = mt.padded_head_dim(head_dim)
  narrow = [f"{f}={getattr(blocks, f)}" for f in mt.NARROW_FIELDS
            if getattr(blocks, f) % 64]
  if narrow and hp <= 128:
    raise NotImplementedError(
        f"MosaicBlocks({', '.join(narrow)}): 32-row blocks run only at "
        f"head_dim 256 (padded), got head_dim {head_dim}")
  # One padded length serves both kernels' query and key tiles.
  # The dQ kernel is query-major like the forward, with its own key tiles.
  dq_blocks = _dq_kernel_blocks(blocks)
  tp = mt.round_up(seq_len_q, math.lcm(mt.CONSUMERS * blocks.block_q,
                                       blocks.block_q_dkv))
  sp = mt.round_up(seq_len_k, math.lcm(mt.CONSUMERS * blocks.block_k_dkv,
                                       blocks.block_k_dq))
  segments = mt.pad_segments(segments, tp, sp)
  inputs = (mt.pad_tokens(q, tp, hp), mt.pad_tokens(k, sp, hp),
            mt.pad_tokens(v, sp, hp), mt.pad_tokens(do, tp, hp),
            mt.pad_axis(lse_log2(lse), 2, tp, jnp.inf))
  common = dict(num_threads=mt.CONSUMERS + 1, thread_name="wg",
                compiler_params=mt.compiler_params())

  num_k_tiles = sp // (mt.CONSUMERS * blocks.block_k_dkv)
  num_q_blocks = tp // blocks.block_q_dkv
  key_costs = _key_tile_costs(mask, num_k_tiles, blocks, group)
  split = _dq_split(blocks, hp, mask, key_costs, num_kv_heads * batch,
                    rotatable=_rotatable(mask, num_q_blocks, num_k_tiles),
                    dtype=q.dtype)
  if not split:  # the dQ kernel first: it may compute delta
    dq, delta = _dq_launch(inputs, segments, delta, out, do, mask=mask,
                           score=score, blocks=blocks, dq_blocks=dq_blocks,
                           group=group, common=common, tp=tp, hp=hp)
  elif delta is None:
    delta = row_delta(out, do)
  delta = mt.pad_axis(delta, 2, tp)
  inputs = (*inputs, delta, *segments)

  dk_dv = {name: out_struct((batch, sp, num_kv_heads, hp), x.dtype, q)
           for name, x in (("dk", k), ("dv", v))}
  order = _walk_order(mask, split, num_q_blocks, num_k_tiles)
  # The fused dQ's float32 sums (two when rotated, `_fused_dq_producer`).
  dq_sum = [out_struct((2 if order == ROTATED else 1, batch, tp, num_heads,
                        hp),
                       jnp.float32, q)]
  dkdv_tiles = mt.Tiles.make(
      key_costs, num_kv_heads, batch,
      persistent=(blocks.persistent and not split
                  and mt.fits_two_slots(
                      2 * mt.CONSUMERS * blocks.block_k_dkv,
                      2 * blocks.stages * blocks.block_q_dkv, hp, q.dtype)
                  and mt.mean_at_most(key_costs, MAX_PERSISTENT_STEPS)),
      last_first=order == UP, tail_fraction=_tail_fraction(key_costs))
  dkdv_scratch = _dkdv_scratch(mask, blocks, hp, q.dtype, split,
                               2 if dkdv_tiles.persistent else 1)
  mt.check_smem(dkdv_scratch, kernel="dK/dV kernel" + (
      " with dQ fused" if split else ""), head_dim=hp, blocks=blocks,
                fields=("block_q_dkv", "block_k_dkv", "stages"))
  grads = {}
  for part in _launch_parts(hp):
    outs = plgpu.kernel(
        functools.partial(_dkdv_kernel, mask=mask, score=score,
                          blocks=blocks, group=group, split=split,
                          order=order, tiles=dkdv_tiles, part=part,
                          num_sems=dq_sum[0].shape[0] * batch * num_heads
                          * num_q_blocks),
        out_type=(*(dk_dv[name] for name in _parts(part)),
                  *(dq_sum if split else [])),
        scratch_types=[dkdv_scratch],
        grid=(dkdv_tiles.num_ctas,), grid_names=("cta",), **common)(
            *inputs, *mt.segment_ranges(
                () if split else segments, blocks.block_q_dkv,
                mt.CONSUMERS * blocks.block_k_dkv, query_major=False),
            *dkdv_tiles.inputs())
    grads.update(zip(_parts(part), outs))
  dk, dv = grads["dk"], grads["dv"]
  if split:
    dq = _finish_dq(outs[-1], mask, blocks.block_q_dkv,
                    mt.CONSUMERS * blocks.block_k_dkv, score.scale, q.dtype,
                    num_k_tiles)
  return (dq[:, :seq_len_q, :, :head_dim], dk[:, :seq_len_k, :, :head_dim],
          dv[:, :seq_len_k, :, :head_dim])


def _shape(x):
  return None if x is None else tuple(x.shape)


def _dq_launch(inputs, segments, delta, out, do, *, mask, score, blocks,
               dq_blocks, group, common, tp: int, hp: int):
  """The dQ kernel on the padded `inputs` (q, k, v, do, base-2 lse): (dq
  [B, tp, N, hp], delta [B, N, tp]). With delta None it computes delta from
  `out` where O fits in its shared memory; else delta comes from
  `row_delta(out, do)` here (do unpadded)."""
  q = inputs[0]
  batch, _, num_heads, _ = q.shape
  tiles = _dq_tiles(mask, blocks, tp // (mt.CONSUMERS * blocks.block_q),
                    num_heads, batch)

  def scratch(in_kernel):
    own = (3 if in_kernel else 2) * mt.CONSUMERS * blocks.block_q
    two = tiles.persistent and mt.fits_two_slots(
        own, 2 * blocks.stages * blocks.block_k_dq, hp, q.dtype)
    return _dq_scratch(mask, dq_blocks, hp, q.dtype, 2 if two else 1,
                       in_kernel)

  in_kernel = delta is None and mt.fits_smem(scratch(True))
  if in_kernel:
    last = mt.pad_tokens(out, tp, hp)
  else:
    if delta is None:
      delta = row_delta(out, do)
    last = mt.pad_axis(delta, 2, tp)
  dq_scratch = scratch(in_kernel)
  mt.check_smem(dq_scratch, kernel="dQ kernel", head_dim=hp, blocks=blocks,
                fields=("block_q", "block_k_dq", "stages"))
  out_types = [out_struct((batch, tp, num_heads, hp), q.dtype, q)]
  if in_kernel:
    out_types.append(out_struct((batch, num_heads, tp), jnp.float32, q))
  outs = plgpu.kernel(
      functools.partial(_dq_kernel, mask=mask, score=score,
                        blocks=dq_blocks, group=group, tiles=tiles,
                        in_kernel=in_kernel),
      out_type=tuple(out_types),
      scratch_types=[dq_scratch],
      grid=(tiles.num_ctas,), grid_names=("cta",), **common)(
          *inputs, last, *segments, *mt.segment_ranges(
              segments, mt.CONSUMERS * blocks.block_q, blocks.block_k_dq,
              query_major=True), *tiles.inputs())
  return outs[0], outs[1] if in_kernel else last


def _finish_dq(dq_sum, mask: MaskRule, block_q: int, block_k: int, scale,
               dtype, num_k_tiles: int):
  """The fused kernel's float32 dQ sums [parts, B, T, N, H] -> dQ: added,
  scaled, in `dtype`, and zero in query blocks that no key tile visits
  (nothing was stored there). The rotated walk's (two sums) stores nothing
  into sum 0 past query block num_k_tiles - 1, nor into sum 1 in block 0
  (`_Walk.add_order`)."""
  dq = dq_sum[0]
  if dq_sum.shape[0] == 2:
    dq = (dq.at[:, num_k_tiles * block_q:].set(0.0)
          + dq_sum[1].at[:, :block_q].set(0.0))
  dq = dq * scale
  rows = np.ones(dq.shape[1], bool)
  for i in range(-(-mask.seq_len_q // block_q)):
    start, _, _, end = mask.key_blocks(i, block_q, block_k)
    rows[i * block_q:(i + 1) * block_q] = start < end
  if not rows.all():
    dq = jnp.where(rows[None, :, None, None], dq, 0.0)
  return dq.astype(dtype)
