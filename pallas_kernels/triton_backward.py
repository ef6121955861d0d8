"""FlashAttention-2 backward (Algorithm 2) as Pallas kernels, Triton lowering.

Two kernels, neither with atomics, so the backward is deterministic:
  * dK/dV: grid (key blocks, batch, kv heads). A program holds one K, V tile
    and streams Q, dO of every query head in its GQA group, so dK/dV arrive
    already summed over the group.
  * dQ: grid (query blocks, batch, query heads), streaming K, V tiles.
Both recompute P = exp(S - LSE) from the forward's LSE; `delta` =
rowsum(dO * O) (Algorithm 2, line 4) comes in precomputed. With dropout
(keep mask Z, regenerated from its hash), O = (P * Z / (1 - rate)) V, so
dV = (P * Z / (1 - rate))^T dO and dS = P * (dP * Z / (1 - rate) - delta);
delta is unchanged.

A third kernel, `bias_gradient`, is the dQ kernel writing dS tiles instead of
accumulating dQ: the bias's gradient (a [B, N, T, S] float32 array). It is a
separate launch so that it runs only when that gradient is asked for.
"""
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import out_struct
from pallas_kernels.scores import ScoreRule, lse_log2
from pallas_kernels import triton_tiles as tiles


def _load_lse2(ref, rows, seq_len: int):
  """LSE in base 2 with +inf where P must be 0: rows past T, fully masked rows."""
  return lse_log2(tiles.load_row_stats(ref, rows, seq_len, other=jnp.inf))


def dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                mask: MaskRule, score: ScoreRule, dropout: DropoutRule,
                block_q: int, block_k: int, head_dim: int, group: int):
  """One [block_k, H] tile of dK and dV, summed over the GQA group.

  Refs: q_ref, do_ref [T_pad, group, Hp]; k_ref, v_ref [block_k, Hp];
  lse_ref, delta_ref [group, T_pad]; the optional refs of
  `tiles.split_optional_refs` (ALiBi: slopes [group]; bias and mask array:
  [(group,) T_pad | 1, block_k | 1] blocks; dropout: two 0-d seeds; segments:
  q ids [T_pad], kv ids [block_k], the 0-d query-block range); then dk_ref,
  dv_ref [block_k, Hp]. Works on transposed tiles (S^T = K Q^T) so that no
  operand tile is transposed.
  """
  opt, (dk_ref, dv_ref) = tiles.split_optional_refs(
      refs, mask=mask, score=score, dropout=dropout)
  segs, slope_ref = opt.segs, opt.slope
  k_block = pl.program_id(0)
  head_dim_padded = k_ref.shape[-1]
  cols = tiles.indices(k_block * block_k, block_k)
  k = tiles.load_tile(k_ref, cols, mask.seq_len_k, head_dim)
  v = tiles.load_tile(v_ref, cols, mask.seq_len_k, head_dim)
  precision = tiles.dot_precision(k_ref.dtype)
  kv_seg = tiles.load_key_segments(segs, cols, mask)

  def step(q_block, carry, *, head, stream, masked: bool):
    dk, dv = carry
    rows = tiles.indices(q_block * block_q, block_q)
    q_rows = pl.ds(q_block * block_q, block_q)
    q = tiles.load_tile(q_ref.at[q_rows, head], rows, mask.seq_len_q, head_dim)
    do = tiles.load_tile(do_ref.at[q_rows, head], rows, mask.seq_len_q,
                         head_dim)
    lse2 = _load_lse2(lse_ref.at[head, q_rows], rows, mask.seq_len_q)
    delta = tiles.load_row_stats(delta_ref.at[head, q_rows], rows,
                                 mask.seq_len_q, other=0.0)
    # -- recompute P^T (Algorithm 2, lines 11-13)
    alibi = None if slope_ref is None else score.alibi_bias(
        slope_ref[head], rows[None, :], cols[:, None])
    bias_t = tiles.load_bias_tile(opt.bias, rows, cols, mask, q_at=q_rows,
                                  head=head, keys_major=True)
    s_t, tanh_t = score.logits_log2(
        plgpu.dot(k, q, trans_b=True, precision=precision), alibi, bias_t)
    p_t = jnp.exp2(s_t - lse2[None, :])
    if masked:
      q_seg = tiles.load_query_segments(segs, rows, mask, at=q_rows)
      mask_tile = tiles.load_pair_tile(opt.mask_array, rows, cols, mask,
                                       other=False, q_at=q_rows, head=head)
      visible = tiles.tile_visibility(mask, rows, cols, q_seg, kv_seg,
                                      mask_tile, keys_major=True)
      p_t = jnp.where(visible, p_t, 0.0)
    # -- dV += P^T dO (line 14), P^T with dropout applied
    dropped = functools.partial(tiles.apply_dropout, dropout=dropout,
                                base=stream, rows=rows, cols=cols,
                                keys_major=True)
    dv = dv + plgpu.dot(dropped(p_t).astype(do.dtype), do, precision=precision)
    # -- dP^T = V dO^T (line 15), through the dropout mask
    dp_t = dropped(plgpu.dot(v, do, trans_b=True, precision=precision))
    # -- dS^T = P^T * (dP^T - delta) (line 16); dK += dS^T Q (line 18)
    ds_t = score.through_cap(p_t * (dp_t - delta[None, :]), tanh_t)
    dk = dk + plgpu.dot(ds_t.astype(q.dtype), q, precision=precision)
    return dk, dv

  bounds = tiles.clamp_to_segments(
      mask.query_blocks(k_block, block_q, block_k), segs)

  batch, kv_head = pl.program_id(1), pl.program_id(2)

  def head_step(head, carry):
    stream = tiles.dropout_base(opt, dropout, batch, kv_head * group + head)
    return tiles.visit_blocks(
        bounds, functools.partial(step, head=head, stream=stream), carry,
        **mask.query_loops())

  zeros = jnp.zeros((block_k, head_dim_padded), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_step, (zeros, zeros))
  tiles.store_tile(dk_ref, dk * score.scale, cols, mask.seq_len_k, head_dim)
  tiles.store_tile(dv_ref, dv, cols, mask.seq_len_k, head_dim)


def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
              mask: MaskRule, score: ScoreRule, dropout: DropoutRule,
              block_q: int, block_k: int, head_dim: int, emit_ds: bool):
  """One [block_q, H] tile of dQ, or (emit_ds) the [block_q, S] rows of dS.

  Refs: q_ref, do_ref [block_q, Hp]; k_ref, v_ref [S_pad, Hp]; lse_ref,
  delta_ref [block_q]; the optional refs of `tiles.split_optional_refs`, as
  in the forward; then dq_ref [block_q, Hp], or (emit_ds) the zero-filled
  input ds_in_ref and its alias ds_ref [block_q, S_pad] float32, of which only
  visited key blocks are written.
  """
  opt, out_refs = tiles.split_optional_refs(refs, mask=mask, score=score,
                                            dropout=dropout)
  tile = tiles.query_tile(q_ref, opt, mask=mask, dropout=dropout,
                          block_q=block_q, head_dim=head_dim)
  rows, precision = tile.rows, tile.precision
  do = tiles.load_tile(do_ref, rows, mask.seq_len_q, head_dim)
  lse2 = _load_lse2(lse_ref, rows, mask.seq_len_q)
  delta = tiles.load_row_stats(delta_ref, rows, mask.seq_len_q, other=0.0)

  def step(k_block, dq, *, masked: bool):
    cols = tiles.indices(k_block * block_k, block_k)
    kv_rows = pl.ds(k_block * block_k, block_k)
    bound = mask.seq_len_k if masked else None
    k = tiles.load_tile(k_ref.at[kv_rows], cols, bound, head_dim)
    v = tiles.load_tile(v_ref.at[kv_rows], cols, bound, head_dim)
    s, tanh_t = tiles.query_scores(tile, k, cols, kv_rows, opt, mask=mask,
                                   score=score)
    p = jnp.exp2(s - lse2[:, None])
    if masked:
      p = jnp.where(tiles.query_visibility(tile, cols, kv_rows, opt,
                                           mask=mask), p, 0.0)
    dp = tiles.apply_dropout(plgpu.dot(do, v, trans_b=True,
                                       precision=precision),
                             dropout, tile.stream, rows, cols)
    ds = score.through_cap(p * (dp - delta[:, None]), tanh_t)
    if emit_ds:
      ok = jnp.logical_and((rows < mask.seq_len_q)[:, None],
                           (cols < mask.seq_len_k)[None, :])
      plgpu.store(out_refs[-1].at[:, kv_rows], ds, mask=ok)
      return dq
    # -- dQ += dS K (Algorithm 2, line 17)
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  bounds = tiles.clamp_to_segments(
      mask.key_blocks(tile.block, block_q, block_k), opt.segs)
  dq = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
  dq = tiles.visit_blocks(bounds, step, dq, **mask.key_loops())
  if not emit_ds:
    tiles.store_tile(out_refs[0], dq * score.scale, rows, mask.seq_len_q,
                     head_dim)


def _variant_args(segments, alibi_slopes, bias, mask_array, seeds):
  return dict(segments=segments, alibi_slopes=alibi_slopes, bias=bias,
              mask_array=mask_array, seeds=seeds)


def backward(q, k, v, do, lse, delta, segments=None, alibi_slopes=None,
             bias=None, mask_array=None, seeds=None, *, mask: MaskRule,
             score: ScoreRule, dropout: DropoutRule, block_q_dkv: int,
             block_k_dkv: int, block_q_dq: int, block_k_dq: int,
             num_warps: int, num_stages: int, interpret: bool):
  """FlashAttention-2 backward: dQ, dK, dV.

  Args:
    q, do: [B, T, N, H]; k, v: [B, S, K, H]; lse, delta: [B, N, T] float32,
    with delta = rowsum(dO * O) (minus the LSE's cotangent, if any).
    segments, alibi_slopes, bias, mask_array, seeds, mask, score, dropout: as
    in the forward.
  Returns:
    dq [B, T, N, H], dk and dv [B, S, K, H], in the inputs' dtypes.
  """
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  hp = tiles.padded_head_dim(head_dim)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  variants = _variant_args(segments, alibi_slopes, bias, mask_array, seeds)

  # dK, dV: one program per (key block, batch, kv head).
  bq = tiles.tile_block(block_q_dkv, seq_len_q)
  bk = tiles.tile_block(block_k_dkv, seq_len_k)
  seq_len_q_padded = pl.cdiv(seq_len_q, bq) * bq
  kv_tile = pl.BlockSpec((None, bk, None, hp), lambda j, b, h: (b, j, h, 0))
  q_group = pl.BlockSpec((None, seq_len_q_padded, group, hp),
                         lambda j, b, h: (b, 0, h, 0))
  stats_group = pl.BlockSpec((None, group, seq_len_q_padded),
                             lambda j, b, h: (b, h, 0))
  specs, arrays = tiles.variant_inputs(
      mask=mask, score=score, dropout=dropout, block_q=bq, block_k=bk,
      seq_len_q=seq_len_q, seq_len_k=seq_len_k, group=group,
      query_major=False, **variants)
  dk, dv = pl.pallas_call(
      functools.partial(dkdv_kernel, mask=mask, score=score, dropout=dropout,
                        head_dim=head_dim, block_q=bq, block_k=bk,
                        group=group),
      grid=(pl.cdiv(seq_len_k, bk), batch, num_kv_heads),
      in_specs=[q_group, kv_tile, kv_tile, q_group, stats_group, stats_group,
                *specs],
      out_specs=[kv_tile, kv_tile],
      out_shape=[out_struct(k.shape, k.dtype, q),
                 out_struct(v.shape, v.dtype, q)],
      compiler_params=params,
      interpret=interpret,
      name="fa2_backward_dkdv",
  )(q, k, v, do, lse, delta, *arrays)

  dq = _query_major_call(
      q, k, v, do, lse, delta, variants, mask=mask, score=score,
      dropout=dropout, block_q=block_q_dq, block_k=block_k_dq, params=params,
      interpret=interpret, emit_ds=False)
  return dq, dk, dv


def bias_gradient(q, k, v, do, lse, delta, segments=None, alibi_slopes=None,
                  bias=None, mask_array=None, seeds=None, *, mask: MaskRule,
                  score: ScoreRule, dropout: DropoutRule, block_q: int,
                  block_k: int, num_warps: int, num_stages: int,
                  interpret: bool):
  """dS = dL/d(scale Q K^T + bias): [B, N, T, S] float32, 0 where masked.

  Arguments as in `backward`. The caller sums dS over the bias's broadcast
  axes. Skipped blocks are never written: they keep the zeros of the buffer
  the kernel writes into.
  """
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  variants = _variant_args(segments, alibi_slopes, bias, mask_array, seeds)
  return _query_major_call(
      q, k, v, do, lse, delta, variants, mask=mask, score=score,
      dropout=dropout, block_q=block_q, block_k=block_k, params=params,
      interpret=interpret, emit_ds=True)


def _query_major_call(q, k, v, do, lse, delta, variants, *, mask, score,
                      dropout, block_q, block_k, params, interpret,
                      emit_ds: bool):
  """The dQ kernel's launch: one program per (query block, batch, query
  head); returns dQ [B, T, N, H], or (emit_ds) dS [B, N, T, S] float32."""
  batch, seq_len_q, num_heads, head_dim = q.shape
  seq_len_k = k.shape[1]
  g = tiles.query_major_grid(q, k, block_q, block_k)
  specs, arrays = tiles.variant_inputs(
      mask=mask, score=score, dropout=dropout, block_q=g.block_q,
      block_k=g.block_k, seq_len_q=seq_len_q, seq_len_k=seq_len_k,
      group=g.group, query_major=True, q_block=g.q_block, **variants)
  inputs = [q, k, v, do, lse, delta, *arrays]
  in_specs = [g.q_spec, g.kv_spec, g.kv_spec, g.q_spec, g.stats_spec,
              g.stats_spec, *specs]
  if emit_ds:
    ds_spec = pl.BlockSpec((None, None, g.block_q, g.seq_len_k_padded),
                           lambda i, b, h: (b, h, g.q_block(i), 0))
    out_shape = out_struct((batch, num_heads, seq_len_q, seq_len_k),
                           jnp.float32, q)
    aliases = {len(inputs): 0}
    inputs.append(jnp.zeros(out_shape.shape, out_shape.dtype))
    in_specs.append(ds_spec)
    out_spec = ds_spec
  else:
    out_shape, out_spec, aliases = (out_struct(q.shape, q.dtype, q),
                                    g.q_spec, {})
  return pl.pallas_call(
      functools.partial(dq_kernel, mask=mask, score=score, dropout=dropout,
                        block_q=g.block_q, block_k=g.block_k,
                        head_dim=head_dim, emit_ds=emit_ds),
      grid=g.grid,
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=params,
      interpret=interpret,
      name="fa2_backward_ds" if emit_ds else "fa2_backward_dq",
  )(*inputs)
