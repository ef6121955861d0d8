"""FlashAttention-2 forward (Algorithm 1) for Hopper, Pallas Mosaic GPU.

Work items are (query tile of n * block_q rows, query head, batch), n =
`MosaicBlocks.consumers`: one CTA each, or, persistent (`mt.Tiles`), one CTA
per SM looping over its share, with the K/V ring running on across tiles and
the next tile's Q loading into a second slot during this one. Each CTA has
n + 1 warpgroups:
  * a producer that TMA-copies the K and V tiles the CTA visits into a ring
    of `stages` shared-memory slots (and the key segment ids with K);
  * n consumers (2, or 3 at head_dim 64), each owning block_q rows of Q in
    shared memory and its own online softmax in registers: S = Q K^T and
    O += P V are wgmma.

Two consumers ping-pong (FlashAttention-3): a shared "schedule" barrier, one
phase apart, lets one warpgroup's softmax run while the other's matmuls hold
the tensor cores; it restarts each tile, or with
`MosaicBlocks.pingpong_across_tiles` runs on through a CTA's tiles. Three
take turns in a ring ("turn" barriers, running on through the tiles): each
issues its O += P V and its next S = Q K^T in its turn, and passes the turn
on, so the others' softmaxes run under its matmuls. With
`MosaicBlocks.overlap` each consumer also overlaps
its own work (FA3's intra-warpgroup pipelining): block j's S = Q K^T is
issued together with block j-1's O += P V, and block j's softmax runs while
the latter does; the consumers then take turns to issue (two "turn"
barriers). Key blocks are visited in the three runs of
`MaskRule.key_blocks`: the blocks every row sees skip the element-wise mask,
the diagonal / band-edge blocks apply it (a 256-key one in 128-key
sub-steps, of which those no row sees are skipped and those every row sees
are left unmasked), the rest are never loaded; with
segment ids, only the blocks that can hold a matching pair are visited,
and those whose queries and keys all share one id skip the element-wise
mask (`mt.narrowed`).
"""
import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_tiles as mt
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import out_struct
from pallas_kernels.scores import LN2, ScoreRule


def _consumer(wg, refs, scratch, *, mask: MaskRule, score: ScoreRule,
              blocks: mt.MosaicBlocks, tiles: mt.Tiles):
  """One consumer warpgroup: rows [q_tile * n bq + wg * bq, + bq) of each of
  the CTA's tiles (n = blocks.consumers)."""
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.stages
  n = blocks.consumers
  ring = n > 2  # the consumers take turns in a ring, not a ping-pong
  q_ref, o_ref, lse_ref = refs["q"], refs["out"], refs["lse"]
  k_smem, v_smem = scratch["k"], scratch["v"]
  bars = scratch["bars"]
  dtype = q_ref.dtype
  q_slots = scratch["q"].shape[0]
  cta = lax.axis_index("cta")
  num_tiles = tiles.count(cta)
  # A wide window's edge blocks compare one bound (benchmarks/NOTES.md
  # item 31).
  one_sided = mask.one_sided_runs(n * bq, bk, query_major=True)

  def load_q(t, slot):  # Q (and its segment ids) of local tile t
    mt.load_own(refs, scratch,
                ["q"] + (["q_seg"] if mask.has_segments else []), bars["q"],
                tiles=tiles, cta=cta, t=t, wg=wg, slot=slot, block=bq,
                consumers=n)

  def schedule():  # both consumers meet here, one phase apart
    plgpu.barrier_arrive(bars["schedule"])
    plgpu.barrier_wait(bars["schedule"])

  def acquire():  # the ring: wait for this consumer's turn
    plgpu.barrier_wait(bars["turn"].at[wg])

  def release():  # the ring: the next consumer's turn
    plgpu.barrier_arrive(bars["turn"].at[lax.rem(wg + 1, n)])

  def tile(t, coords, first):
    q_tile, head, batch = coords
    bounds, loops = mt.visited_runs(mask, refs.get("seg_range"), batch,
                                    q_tile, n * bq, bk, query_major=True)
    start, end = bounds[0], bounds[3]
    row0 = mt.own_rows(q_tile, wg, bq, n)[0]
    # O is staged in the Q slot (and the LSE buffer is reused).
    q_slot, next_q = mt.operand_slot(
        t, num_tiles, q_slots, load_q,
        lambda slot: mt.own_slot(bars["q"], slot, wg, n))
    q_smem = scratch["q"].at[q_slot, wg]
    q_seg = (mt.load_vector(scratch["q_seg"].at[q_slot, wg], axis=0)
             if mask.has_segments else None)

    def softmax(s, kv_block, slot, m_i, *, masked, keys=None,
                free_k=True):
      """Online softmax of one block (Algorithm 1, lines 9-10), base 2:
      (P in float32, the new m, alpha = the rescale of O and l). `masked`:
      False, or the block's run (`mt.tile_visible`'s `run`). `keys`:
      the (offset, width) of the block's keys in S (all of them if None).
      Frees the block's K slot (if `free_k`, a bool or a predicate) once
      the mask has read its segment ids."""
      off, width = keys or (0, bk)
      s, c, _ = score.deferred_log2(s)  # base-2 logits are s * c
      scaled = (lambda x: x) if c is None else (lambda x: x * c)
      if masked:
        kv_seg = None
        if mask.has_segments:
          kv_seg = mt.load_vector(
              mt.key_rows(scratch["kv_seg"].at[slot], keys), axis=1)
        visible = mt.tile_visible(mask, (bq, width), row0, kv_block * bk + off,
                                  query_axis=0, q_seg=q_seg, kv_seg=kv_seg,
                                  run=masked, one_sided=one_sided)
        s = jnp.where(visible, s, -jnp.inf)
      mt.when(free_k, lambda: plgpu.barrier_arrive(bars["k_free"].at[slot]))
      m_new = jnp.maximum(m_i, scaled(s.max(axis=1)))
      # A row that has seen no visible key keeps m = -inf: subtract 0 then.
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_use)
      p = jnp.exp2(scaled(s) - mt.broadcast(m_use, s.shape, 0))
      return p, m_new, alpha

    def ring_slot(kv_block):
      return mt.slot_of(mt.key_ring_step(first, bounds, kv_block), stages)

    def step(kv_block, carry, *, masked, keys=None, first=True,
             last=True):
      """One ping-pong step over keys [off, off + width) = `keys` of block
      kv_block (the whole block if None). `first` / `last` (bools or
      predicates): the block's first / last step run, which issues the
      Q prefetch and waits for V / frees the block's slots."""
      acc, m_i, l_i = carry
      slot = ring_slot(kv_block)
      width = keys[1] if keys else bk
      k_keys, v_keys = (mt.key_rows(ref.at[slot], keys)
                        for ref in (k_smem, v_smem))

      def qk(acc_ref):  # S = Q K^T
        plgpu.wgmma(acc_ref, q_smem, k_keys.T)
        if next_q:  # the next tile's Q loads under this tile
          mt.when(mt.both(first, kv_block == start
                          + mt.prefetch_step(end - start)), next_q)
        if ring:  # this S closes the turn the last O += P V took, unless
          # it is the tile's first step
          mt.when(mt.negate(mt.both(first, kv_block == start)), release)
        else:
          schedule()  # the other consumer's softmax runs during this wgmma
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, width), jnp.float32))
      p, m_new, alpha = softmax(s, kv_block, slot, m_i, masked=masked,
                                keys=keys, free_k=last)
      acc = acc * mt.broadcast(alpha, acc.shape, 0)
      l_i = l_i * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      if ring:
        mt.when(first, lambda: plgpu.barrier_wait(bars["v_ready"].at[slot]))
        acquire()
      else:
        plgpu.barrier_arrive(bars["schedule"])  # softmax done
        mt.when(first, lambda: plgpu.barrier_wait(bars["v_ready"].at[slot]))
        plgpu.barrier_wait(bars["schedule"])  # tensor cores free

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_keys)
        if ring:  # the tile's last step: no S follows
          mt.when(mt.both(last, kv_block == end - 1), release)
        nxt = kv_block + 1
        # The next K lands while this wgmma runs.
        mt.when(mt.both(last, nxt < end), lambda: plgpu.barrier_wait(
            bars["k_ready"].at[ring_slot(nxt)]))

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      mt.when(last, lambda: plgpu.barrier_arrive(bars["v_free"].at[slot]))
      return acc, m_new, l_i

    # Masked 256-key blocks run as 128-key sub-steps, skipping those no row
    # of the tile sees and leaving the mask off those every row sees (a
    # masked [64, 256] step is far dearer than two [64, 128] ones;
    # benchmarks/NOTES.md item 29). Both consumers run the same sub-steps,
    # so the ping-pong stays in phase.
    sub = mt.MASKED_SUB_STEP
    split = (bk > sub and bk % sub == 0
             and (loops["leading"] or loops["trailing"]))
    if split:
      sub_bounds = mask.key_blocks(q_tile, n * bq, sub)

    def split_step(kv_block, carry, masked):
      """A masked block (of run `masked`) as bk // sub sub-steps over its
      keys."""
      subs = bk // sub
      first_sub = kv_block * subs
      lo = jnp.maximum(sub_bounds[0], first_sub)  # the sub-steps to run
      hi = jnp.minimum(sub_bounds[3], first_sub + subs)
      for h in range(subs):
        i = first_sub + h
        kw = dict(keys=(h * sub, sub), first=i == lo, last=i == hi - 1)
        run = jnp.logical_and(lo <= i, i < hi)
        masked_sub = functools.partial(step, kv_block, masked=masked, **kw)
        if mask.dense_blocks:  # by position alone: every row sees it?
          whole = jnp.logical_and(sub_bounds[1] <= i, i < sub_bounds[2])
          plain_sub = functools.partial(step, kv_block, masked=False, **kw)
          carry = lax.cond(
              run, lambda c, plain_sub=plain_sub, masked_sub=masked_sub,
              whole=whole: lax.cond(whole, plain_sub, masked_sub, c),
              lambda c: c, carry)
        else:
          carry = lax.cond(run, masked_sub, lambda c: c, carry)
      return carry

    def block_step(kv_block, carry, *, masked):
      if masked and split:
        return split_step(kv_block, carry, masked)
      return step(kv_block, carry, masked=masked)

    def overlapped_step(kv_block, carry, *, masked):
      """Block kv_block's S = Q K^T issued with the previous block's
      O += P V (the consumers take turns to issue), and this block's
      softmax run while the latter does."""
      acc, m_i, l_i, p16 = carry
      slot, prev = ring_slot(kv_block), ring_slot(kv_block - 1)

      def body(refs):
        acc_ref, s_ref, p16_ref, m_ref, l_ref, alpha_ref = refs
        plgpu.barrier_wait(bars["k_ready"].at[slot])
        plgpu.barrier_wait(bars["v_ready"].at[prev])
        plgpu.barrier_wait(bars["turn"].at[wg])
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
        plgpu.wgmma(acc_ref, p16, v_smem.at[prev])
        plgpu.barrier_arrive(bars["turn"].at[1 - wg])
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        p, m_ref[...], alpha = softmax(s, kv_block, slot, m_i,
                                       masked=masked)
        l_ref[...] = l_i * alpha + p.sum(axis=1)
        p16_ref[...], alpha_ref[...] = p.astype(dtype), alpha

      acc, _, p16, m_i, l_i, alpha = pl.run_state(body)((
          plgpu.ACC.init(acc), plgpu.ACC.init(mt.wgmma_zeros((bq, bk))),
          p16, m_i, l_i, m_i))
      plgpu.barrier_arrive(bars["v_free"].at[prev])
      return acc * mt.broadcast(alpha, acc.shape, 0), m_i, l_i, p16

    carry = (mt.wgmma_zeros((bq, q_smem.shape[-1])),
             mt.row_vector(-jnp.inf, bq), mt.row_vector(0.0, bq))

    if blocks.overlap:
      any_masked = loops["leading"] or loops["trailing"]

      def first_block():
        slot = ring_slot(start)
        plgpu.barrier_wait(bars["k_ready"].at[slot])
        s = mt.matmul_t(q_smem, k_smem.at[slot], (bq, bk),
                        during=next_q or None)
        p, m_i, _ = softmax(s, start, slot, carry[1], masked=any_masked)
        return p.astype(dtype), m_i, p.sum(axis=1)

      def last_block(acc, p16):
        slot = ring_slot(end - 1)
        plgpu.barrier_wait(bars["v_ready"].at[slot])
        acc = pl.run_state(lambda r: plgpu.wgmma(r, p16, v_smem.at[slot]))(
            plgpu.ACC.init(acc))
        plgpu.barrier_arrive(bars["v_free"].at[slot])
        return acc

      def blocks_of_tile():
        p16, m_i, l_i = first_block()
        lo = start + 1
        rest = (lo, jnp.maximum(bounds[1], lo), jnp.maximum(bounds[2], lo),
                end)
        acc, m_i, l_i, p16 = mt.visit_runs(rest, loops, overlapped_step,
                                           (carry[0], m_i, l_i, p16))
        return last_block(acc, p16), m_i, l_i

      carry = lax.cond(end > start, blocks_of_tile, lambda: carry)
      if next_q:
        pl.when(end == start)(next_q)  # a tile with no step
    else:
      @pl.when(end > start)
      def _():
        plgpu.barrier_wait(bars["k_ready"].at[mt.slot_of(first, stages)])

      restart = not (ring or blocks.pingpong_across_tiles)
      if restart:  # consumer 0 goes first
        pl.when(wg == 1)(schedule)
      carry = mt.visit_runs(bounds, loops, block_step, carry)
      if restart:
        pl.when(wg == 0)(schedule)
      if next_q:
        pl.when(end == start)(next_q)  # a tile with no step

    # One final rescale (line 12); rows that saw no key output 0, lse -inf.
    # O is staged in this tile's Q slot. One reciprocal per row, not a
    # division per element (benchmarks/NOTES.md item 38).
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    q_smem[...] = (acc * mt.broadcast(1.0 / l_safe, acc.shape, 0)
                   ).astype(dtype)
    lse_smem = scratch["lse"].at[wg]
    lse_smem[...] = jnp.where(empty, -jnp.inf,
                              (m_i + jnp.log2(l_safe)) * LN2)
    plgpu.commit_smem()
    rows = mt.own_rows(q_tile, wg, bq, n)[1]
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, rows])
    return first + end - start

  if q_slots > 1:
    pl.when(num_tiles > 0)(lambda: load_q(0, 0))
  if blocks.overlap:  # consumer 0 issues first
    pl.when(wg == 1)(lambda: plgpu.barrier_arrive(bars["turn"].at[0]))
  elif ring:  # consumer 0 takes the first turn
    pl.when(wg == n - 1)(release)
  elif blocks.pingpong_across_tiles:  # consumer 0 goes first, once
    pl.when(wg == 1)(schedule)
  tiles.loop(tile, jnp.int32(0))
  if not (blocks.overlap or ring) and blocks.pingpong_across_tiles:
    pl.when(wg == 0)(schedule)
  plgpu.wait_smem_to_gmem(0)


def _kernel(*args, mask: MaskRule, score: ScoreRule, blocks: mt.MosaicBlocks,
            group: int, tiles: mt.Tiles):
  names = ["q", "k", "v"] + (["q_seg", "kv_seg", "seg_range"]
                             if mask.has_segments else [])
  names += tiles.input_names()
  mt.query_major_kernel(
      args, names + ["out", "lse"],
      functools.partial(_consumer, mask=mask, score=score, blocks=blocks),
      mask=mask, blocks=blocks, group=group, tiles=tiles)


def _max_mean_varied(head_dim: int):
  """The longest mean tile (key blocks) at which the forward's tiles of
  varied lengths (causal) still run persistent: any at head_dim 64, where
  the balanced schedule beat the hardware's order at 16k (506-508 against
  477-499 TFLOP/s); at 128 up to 8k tokens (mean 32.5 blocks: 621-623
  against 597-607), not 16k (64.5 blocks: 589-614 against 616-640;
  benchmarks/NOTES.md item 40)."""
  return float("inf") if head_dim <= 64 else 64


def _check_pairs_agree(mask: MaskRule, num_tiles: int, rows: int,
                       block_k: int):
  """NotImplementedError unless both query tiles of every cluster pair
  (2i, 2i + 1) visit the same key blocks, as the shared K/V stream needs:
  no causal mask, window or segment ids."""
  agree = not mask.has_segments and all(
      mask.key_blocks(i, rows, block_k) == mask.key_blocks(i + 1, rows,
                                                           block_k)
      for i in range(0, num_tiles, 2))
  if not agree:
    raise NotImplementedError(
        "MosaicBlocks(cluster=2) needs the two query tiles of a cluster to "
        "visit the same key blocks: no causal mask, local window or segment "
        f"ids (got is_causal={mask.is_causal}, window=({mask.window_left}, "
        f"{mask.window_right}), segment ids={mask.has_segments})")


def _scratch(mask: MaskRule, blocks: mt.MosaicBlocks, head_dim: int, dtype,
             q_slots: int):
  bq, n = blocks.block_q, blocks.consumers
  ring, ring_bars = mt.kv_ring_scratch(mask, blocks.block_k, blocks.stages,
                                       head_dim, dtype, n, blocks.cluster)
  scratch = dict(
      q=mt.tile_smem((q_slots, n, bq, head_dim), dtype),
      lse=plgpu.SMEM((n, bq), jnp.float32), **ring,
      bars=dict(
          q=plgpu.Barrier(num_arrivals=2 if mask.has_segments else 1,
                          num_barriers=q_slots * n),
          schedule=plgpu.Barrier(num_arrivals=n), **ring_bars))
  if blocks.overlap or n > 2:
    scratch["bars"]["turn"] = plgpu.Barrier(num_barriers=n)
  if mask.has_segments:
    scratch["q_seg"] = plgpu.SMEM((q_slots, n, bq), jnp.int32)
  return scratch


def forward(q, k, v, segments=None, *, mask: MaskRule, score: ScoreRule,
            blocks: mt.MosaicBlocks):
  """FlashAttention-2 forward on Hopper.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H], float16 or bfloat16, N a multiple
      of K, H <= 256 (padded to 64, 128 or 256).
    segments: None, or (q_segments [B, T], kv_segments [B, S]) int32
      (iff `mask.has_segments`).
    mask: the visibility rule (no mask array); score: scale and soft cap
      (no bias, no ALiBi).
  Returns:
    out [B, T, N, H] in q's dtype, lse [B, N, T] float32 (natural log).
  """
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
  hp = mt.padded_head_dim(head_dim)
  asked = blocks  # the forward's ring depth is `forward_stages` where set
  stages_field = "stages" if blocks.forward_stages is None else "forward_stages"
  blocks = dataclasses.replace(blocks, stages=getattr(blocks, stages_field),
                               forward_stages=None)
  if blocks.consumers > 2 and (hp > 128 or hp > 64 and blocks.block_k > 64):
    raise NotImplementedError(
        f"MosaicBlocks.consumers={blocks.consumers} needs head_dim <= 64, "
        f"or <= 128 with block_k=64 (160 registers per consumer), got "
        f"head_dim {head_dim} with block_k {blocks.block_k}")
  rows_per_cta = blocks.consumers * blocks.block_q
  cluster = blocks.cluster
  tp = mt.round_up(seq_len_q, rows_per_cta * cluster)
  sp = mt.round_up(seq_len_k, blocks.block_k)
  if cluster > 1:
    _check_pairs_agree(mask, tp // rows_per_cta, rows_per_cta,
                       blocks.block_k)
  segments = mt.pad_segments(segments, tp, sp)
  kv_rows = mt.kv_rows(seq_len_k, blocks.block_k)
  inputs = (mt.pad_tokens(q, tp, hp), mt.pad_tokens(k, kv_rows, hp),
            mt.pad_tokens(v, kv_rows, hp), *segments,
            *mt.segment_ranges(segments, rows_per_cta, blocks.block_k,
                               query_major=True))
  tiles = mt.Tiles.make(
      mt.tile_costs(lambda i: mask.key_blocks(i * cluster, rows_per_cta,
                                              blocks.block_k),
                    tp // rows_per_cta // cluster), num_heads, batch,
      persistent=blocks.persistent and mt.fits_two_slots(
          rows_per_cta, 2 * blocks.stages * blocks.block_k,
          hp, q.dtype),
      max_mean_varied=_max_mean_varied(hp), cluster=cluster)
  # A CTA with several tiles loads the next one's Q during this one.
  q_slots = 2 if tiles.persistent else 1
  scratch = _scratch(mask, blocks, hp, q.dtype, q_slots)
  mt.check_smem(scratch, kernel="forward", head_dim=hp, blocks=asked,
                fields=("consumers", "block_q", "block_k", stages_field))
  launch = (dict(cluster=(cluster,), cluster_names=("cluster",))
            if cluster > 1 else {})
  kernel = functools.partial(
      _kernel, mask=mask, score=score, blocks=blocks,
      group=num_heads // num_kv_heads, tiles=tiles)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(out_struct((batch, tp, num_heads, hp), q.dtype, q),
                out_struct((batch, num_heads, tp), jnp.float32, q)),
      scratch_types=[scratch],
      grid=(tiles.num_ctas,),
      grid_names=("cta",),
      num_threads=blocks.consumers + 1,
      thread_name="wg",
      compiler_params=mt.compiler_params(),
      **launch,
  )(*inputs, *tiles.inputs())
  return out[:, :seq_len_q, :, :head_dim], lse[:, :, :seq_len_q]
