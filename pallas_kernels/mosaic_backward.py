"""FlashAttention-2 backward (Algorithm 2) for Hopper, Pallas Mosaic GPU.

Two kernels, both deterministic (no atomics): each output tile is summed by
one CTA in a fixed order.

* dK/dV: one CTA per (CONSUMERS * block_k_dkv keys, kv head, batch). Each
  consumer warpgroup keeps 64 keys of K and V in shared memory and dK, dV in
  registers; the producer streams Q, dO, LSE and delta of every query head of
  the kv head's group (GQA sums inside the CTA) and every query block that
  sees the keys. Per step: S^T = K Q^T, P^T = exp(S^T - LSE),
  dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
* dQ: one CTA per (CONSUMERS * block_q rows, query head, batch); each
  consumer keeps Q and dO, the producer streams K and V:
  S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.

The LSE comes in as base 2 (`scores.lse_log2`: +inf for rows that see no
key and for padded rows, so their P is 0).
"""
import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_tiles as mt
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import out_struct
from pallas_kernels.scores import ScoreRule, lse_log2


def _probabilities(s_raw, lse2, *, mask, score, masked, shape, query_axis,
                   q_start, k_start, q_seg, kv_seg):
  """(P, tanh term) of one tile from raw scores and base-2 LSE."""
  x, t = score.logits_log2(s_raw)
  if masked:
    visible = mt.tile_visible(mask, shape, q_start, k_start,
                              query_axis=query_axis, q_seg=q_seg,
                              kv_seg=kv_seg)
    x = jnp.where(visible, x, -jnp.inf)
  return jnp.exp2(x - mt.broadcast(lse2, shape, query_axis)), t


# ---------------------------------------------------------------- dK / dV

def _dkdv_consumer(wg, refs, scratch, *, mask, score, blocks, k_tile,
                   kv_head, batch, group: int, bounds):
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.stages
  bars = scratch["bars"]
  dtype = refs["k"].dtype
  start, _, _, end = bounds
  num_q = end - start
  key0 = k_tile * (mt.CONSUMERS * bk) + wg * bk
  keys = pl.ds(key0, bk)
  k_smem, v_smem = scratch["k"].at[wg], scratch["v"].at[wg]
  plgpu.copy_gmem_to_smem(refs["k"].at[batch, keys, kv_head], k_smem,
                          bars["kv"].at[wg])
  plgpu.copy_gmem_to_smem(refs["v"].at[batch, keys, kv_head], v_smem,
                          bars["kv"].at[wg])
  if mask.has_segments:
    plgpu.copy_gmem_to_smem(refs["kv_seg"].at[batch, keys],
                            scratch["kv_seg"].at[wg], bars["kv"].at[wg])
  plgpu.barrier_wait(bars["kv"].at[wg])
  kv_seg = (mt.load_vector(scratch["kv_seg"].at[wg], axis=0)
            if mask.has_segments else None)
  hp = k_smem.shape[-1]

  def head_loop(g, carry):
    def step(q_block, carry, *, masked: bool):
      dk, dv = carry
      slot = mt.slot_of(g * num_q + q_block - start, stages)
      q_smem, do_smem = scratch["q"].at[slot], scratch["do"].at[slot]
      plgpu.barrier_wait(bars["q_ready"].at[slot])

      s = mt.matmul_t(k_smem, q_smem, (bk, bq))  # S^T = K Q^T
      q_seg = (mt.load_vector(scratch["q_seg"].at[slot], axis=1)
               if mask.has_segments else None)
      lse2 = mt.load_vector(scratch["lse"].at[slot], axis=1)
      p, t = _probabilities(s, lse2, mask=mask, score=score, masked=masked,
                            shape=(bk, bq), query_axis=1,
                            q_start=q_block * bq, k_start=key0, q_seg=q_seg,
                            kv_seg=kv_seg)
      plgpu.barrier_wait(bars["do_ready"].at[slot])

      def dv_dp(refs_):
        dv_ref, dp_ref = refs_
        plgpu.wgmma(dv_ref, p.astype(dtype), do_smem)
        plgpu.wgmma(dp_ref, v_smem, do_smem.T)

      dv, dp = pl.run_state(dv_dp)((plgpu.ACC.init(dv),
                                    plgpu.ACC.init(mt.wgmma_zeros((bk, bq)))))
      delta = mt.load_vector(scratch["delta"].at[slot], axis=1)
      ds = score.through_cap(p * (dp - mt.broadcast(delta, (bk, bq), 1)), t)

      def dk_acc(acc_ref):
        plgpu.wgmma(acc_ref, ds.astype(dtype), q_smem)

      dk = pl.run_state(dk_acc)(plgpu.ACC.init(dk))
      plgpu.barrier_arrive(bars["free"].at[slot])
      return dk, dv

    return mt.visit_runs(bounds, mask.query_loops(), step, carry)

  zeros = mt.wgmma_zeros((bk, hp))
  dk, dv = lax.fori_loop(0, group, head_loop, (zeros, zeros))
  k_smem[...] = (dk * score.scale).astype(dtype)
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, refs["dk"].at[batch, keys, kv_head])
  plgpu.copy_smem_to_gmem(v_smem, refs["dv"].at[batch, keys, kv_head])
  plgpu.wait_smem_to_gmem(0)


def _dkdv_producer(refs, scratch, *, mask, blocks, kv_head, batch,
                   group: int, bounds):
  bq, stages = blocks.block_q_dkv, blocks.stages
  bars = scratch["bars"]
  start, _, _, end = bounds
  num_q = jnp.maximum(end - start, 1)

  def load(i, slot, wait_free):
    g = lax.div(i, num_q)
    head = kv_head * group + g
    rows = pl.ds((start + lax.rem(i, num_q)) * bq, bq)
    wait_free(bars["free"])
    ready = bars["q_ready"].at[slot]
    plgpu.copy_gmem_to_smem(refs["q"].at[batch, rows, head],
                            scratch["q"].at[slot], ready)
    plgpu.copy_gmem_to_smem(refs["lse"].at[batch, head, rows],
                            scratch["lse"].at[slot], ready)
    if mask.has_segments:
      plgpu.copy_gmem_to_smem(refs["q_seg"].at[batch, rows],
                              scratch["q_seg"].at[slot], ready)
    ready = bars["do_ready"].at[slot]
    plgpu.copy_gmem_to_smem(refs["do"].at[batch, rows, head],
                            scratch["do"].at[slot], ready)
    plgpu.copy_gmem_to_smem(refs["delta"].at[batch, head, rows],
                            scratch["delta"].at[slot], ready)

  mt.fill_ring(group * (end - start), stages, load)


def _dkdv_kernel(*args, mask, score, blocks, group: int):
  names = ["q", "k", "v", "do", "lse", "delta"]
  names += ["q_seg", "kv_seg"] if mask.has_segments else []
  refs, scratch = mt.named_refs(args, names + ["dk", "dv"])
  k_tile, kv_head, batch = (lax.axis_index(a) for a in ("k", "kv", "b"))
  bounds = mask.query_blocks(k_tile, blocks.block_q_dkv,
                             mt.CONSUMERS * blocks.block_k_dkv)
  common = dict(mask=mask, blocks=blocks, kv_head=kv_head, batch=batch,
                group=group, bounds=bounds)
  mt.warp_specialize(
      lambda wg: _dkdv_consumer(wg, refs, scratch, score=score,
                                k_tile=k_tile, **common),
      lambda: _dkdv_producer(refs, scratch, **common))


def _dkdv_scratch(mask, blocks, hp: int, dtype):
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.stages
  segs = 1 if mask.has_segments else 0
  scratch = dict(
      k=mt.tile_smem((mt.CONSUMERS, bk, hp), dtype),
      v=mt.tile_smem((mt.CONSUMERS, bk, hp), dtype),
      q=mt.tile_smem((stages, bq, hp), dtype),
      do=mt.tile_smem((stages, bq, hp), dtype),
      lse=plgpu.SMEM((stages, bq), jnp.float32),
      delta=plgpu.SMEM((stages, bq), jnp.float32),
      bars=dict(
          kv=plgpu.Barrier(num_arrivals=2 + segs, num_barriers=mt.CONSUMERS),
          q_ready=plgpu.Barrier(num_arrivals=2 + segs, num_barriers=stages),
          do_ready=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          free=plgpu.Barrier(num_arrivals=mt.CONSUMERS,
                             num_barriers=stages)))
  if mask.has_segments:
    scratch["kv_seg"] = plgpu.SMEM((mt.CONSUMERS, bk), jnp.int32)
    scratch["q_seg"] = plgpu.SMEM((stages, bq), jnp.int32)
  return scratch


# ---------------------------------------------------------------- dQ

def _dq_consumer(wg, refs, scratch, *, mask, score, blocks, q_tile, head,
                 batch, bounds):
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.stages
  bars = scratch["bars"]
  dtype = refs["q"].dtype
  start = bounds[0]
  row0 = q_tile * (mt.CONSUMERS * bq) + wg * bq
  rows = pl.ds(row0, bq)
  q_smem, do_smem = scratch["q"].at[wg], scratch["do"].at[wg]
  ready = bars["q"].at[wg]
  plgpu.copy_gmem_to_smem(refs["q"].at[batch, rows, head], q_smem, ready)
  plgpu.copy_gmem_to_smem(refs["do"].at[batch, rows, head], do_smem, ready)
  plgpu.copy_gmem_to_smem(refs["lse"].at[batch, head, rows],
                          scratch["lse"].at[wg], ready)
  plgpu.copy_gmem_to_smem(refs["delta"].at[batch, head, rows],
                          scratch["delta"].at[wg], ready)
  if mask.has_segments:
    plgpu.copy_gmem_to_smem(refs["q_seg"].at[batch, rows],
                            scratch["q_seg"].at[wg], ready)
  plgpu.barrier_wait(ready)
  lse2 = mt.load_vector(scratch["lse"].at[wg], axis=0)
  delta = mt.load_vector(scratch["delta"].at[wg], axis=0)
  q_seg = (mt.load_vector(scratch["q_seg"].at[wg], axis=0)
           if mask.has_segments else None)

  def step(kv_block, dq, *, masked: bool):
    slot = mt.slot_of(kv_block - start, stages)
    k_smem, v_smem = scratch["k"].at[slot], scratch["v"].at[slot]
    plgpu.barrier_wait(bars["k_ready"].at[slot])

    s = mt.matmul_t(q_smem, k_smem, (bq, bk))  # S = Q K^T
    kv_seg = (mt.load_vector(scratch["kv_seg"].at[slot], axis=1)
              if mask.has_segments and masked else None)
    p, t = _probabilities(s, lse2, mask=mask, score=score, masked=masked,
                          shape=(bq, bk), query_axis=0, q_start=row0,
                          k_start=kv_block * bk, q_seg=q_seg, kv_seg=kv_seg)
    plgpu.barrier_wait(bars["v_ready"].at[slot])

    dp = mt.matmul_t(do_smem, v_smem, (bq, bk))  # dP = dO V^T
    plgpu.barrier_arrive(bars["v_free"].at[slot])
    ds = score.through_cap(p * (dp - mt.broadcast(delta, (bq, bk), 0)), t)

    def dq_acc(acc_ref):
      plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem)

    dq = pl.run_state(dq_acc)(plgpu.ACC.init(dq))
    plgpu.barrier_arrive(bars["k_free"].at[slot])
    return dq

  dq = mt.visit_runs(bounds, mask.key_loops(), step,
                     mt.wgmma_zeros((bq, q_smem.shape[-1])))
  q_smem[...] = (dq * score.scale).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, refs["dq"].at[batch, rows, head])
  plgpu.wait_smem_to_gmem(0)


def _dq_kernel(*args, mask, score, blocks, group: int, num_q_tiles: int):
  names = ["q", "k", "v", "do", "lse", "delta"]
  names += ["q_seg", "kv_seg"] if mask.has_segments else []
  mt.query_major_kernel(
      args, names + ["dq"],
      functools.partial(_dq_consumer, mask=mask, score=score, blocks=blocks),
      mask=mask, blocks=blocks, group=group, num_q_tiles=num_q_tiles)


def _dq_scratch(mask, blocks, hp: int, dtype):
  bq = blocks.block_q
  segs = 1 if mask.has_segments else 0
  ring, ring_bars = mt.kv_ring_scratch(mask, blocks.block_k, blocks.stages,
                                       hp, dtype)
  scratch = dict(
      q=mt.tile_smem((mt.CONSUMERS, bq, hp), dtype),
      do=mt.tile_smem((mt.CONSUMERS, bq, hp), dtype),
      lse=plgpu.SMEM((mt.CONSUMERS, bq), jnp.float32),
      delta=plgpu.SMEM((mt.CONSUMERS, bq), jnp.float32), **ring,
      bars=dict(q=plgpu.Barrier(num_arrivals=4 + segs,
                                num_barriers=mt.CONSUMERS), **ring_bars))
  if mask.has_segments:
    scratch["q_seg"] = plgpu.SMEM((mt.CONSUMERS, bq), jnp.int32)
  return scratch


# ---------------------------------------------------------------- wrapper

def backward(q, k, v, do, lse, delta, segments=None, *, mask: MaskRule,
             score: ScoreRule, blocks: mt.MosaicBlocks):
  """FlashAttention-2 backward on Hopper: dQ, dK, dV.

  Args:
    q, do: [B, T, N, H]; k, v: [B, S, K, H] (float16 or bfloat16);
    lse, delta: [B, N, T] float32, lse in natural log, delta = rowsum(dO O).
    segments, mask, score, blocks: as in `mosaic_forward.forward`.
  Returns:
    dq [B, T, N, H], dk and dv [B, S, K, H], in the inputs' dtype.
  """
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  hp = mt.padded_head_dim(head_dim)
  # One padded length serves both kernels' query and key tiles.
  tp = mt.round_up(seq_len_q, math.lcm(mt.CONSUMERS * blocks.block_q,
                                       blocks.block_q_dkv))
  sp = mt.round_up(seq_len_k, math.lcm(mt.CONSUMERS * blocks.block_k_dkv,
                                       blocks.block_k))
  inputs = (mt.pad_tokens(q, tp, hp), mt.pad_tokens(k, sp, hp),
            mt.pad_tokens(v, sp, hp), mt.pad_tokens(do, tp, hp),
            mt.pad_axis(lse_log2(lse), 2, tp, jnp.inf),
            mt.pad_axis(delta, 2, tp),
            *mt.pad_segments(segments, tp, sp))
  common = dict(num_threads=mt.CONSUMERS + 1, thread_name="wg",
                compiler_params=mt.compiler_params())

  num_k_tiles = sp // (mt.CONSUMERS * blocks.block_k_dkv)
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, mask=mask, score=score, blocks=blocks,
                        group=group),
      out_type=(out_struct((batch, sp, num_kv_heads, hp), k.dtype, q),
                out_struct((batch, sp, num_kv_heads, hp), v.dtype, q)),
      scratch_types=[_dkdv_scratch(mask, blocks, hp, q.dtype)],
      grid=(num_k_tiles, num_kv_heads, batch), grid_names=("k", "kv", "b"),
      **common)(*inputs)

  num_q_tiles = tp // (mt.CONSUMERS * blocks.block_q)
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, mask=mask, score=score, blocks=blocks,
                        group=group, num_q_tiles=num_q_tiles),
      out_type=out_struct((batch, tp, num_heads, hp), q.dtype, q),
      scratch_types=[_dq_scratch(mask, blocks, hp, q.dtype)],
      grid=(num_q_tiles, num_heads, batch), grid_names=("q", "n", "b"),
      **common)(*inputs)
  return (dq[:, :seq_len_q, :, :head_dim], dk[:, :seq_len_k, :, :head_dim],
          dv[:, :seq_len_k, :, :head_dim])
