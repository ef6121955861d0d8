"""FlashAttention-2 forward (Algorithm 1) as a Pallas kernel, Triton lowering.

Grid: (query blocks, batch, query heads). Each program keeps one Q tile on
chip, streams K and V tiles through an online softmax in float32 (base 2, so
`exp2` with the scale folded into one multiply), rescales once at the end, and
writes only O and the natural-log LSE.
"""
import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.outputs import out_struct
from pallas_kernels.scores import LN2, ScoreRule
from pallas_kernels import triton_tiles as tiles


def forward_kernel(q_ref, k_ref, v_ref, *refs, mask: MaskRule,
                   score: ScoreRule, dropout: DropoutRule, block_q: int,
                   block_k: int, head_dim: int):
  """One [block_q, H] tile of O and its [block_q] LSE.

  Refs: q_ref [block_q, Hp], k_ref and v_ref [S_pad, Hp] (one kv head); the
  optional refs of `tiles.split_optional_refs` (ALiBi: the 0-d slope; bias and
  mask array: [block_q | 1, S_pad | 1] blocks; dropout: two 0-d seeds;
  segments: q ids [block_q], kv ids [S_pad], the 0-d key-block range); then
  o_ref [block_q, Hp], lse_ref [block_q]. Hp is head_dim padded to a power of
  two.
  """
  opt, (o_ref, lse_ref) = tiles.split_optional_refs(
      refs, mask=mask, score=score, dropout=dropout)
  tile = tiles.query_tile(q_ref, opt, mask=mask, dropout=dropout,
                          block_q=block_q, head_dim=head_dim)
  rows = tile.rows

  def step(k_block, carry, *, masked: bool):
    acc, m_i, l_i = carry
    cols = tiles.indices(k_block * block_k, block_k)
    kv_rows = pl.ds(k_block * block_k, block_k)
    # Unmasked blocks lie wholly inside S: only head_dim padding to mask.
    bound = mask.seq_len_k if masked else None
    k = tiles.load_tile(k_ref.at[kv_rows], cols, bound, head_dim)
    # Logits in base 2 (e^x = 2^(x log2 e)), soft-capped and ALiBi if asked.
    s, _ = tiles.query_scores(tile, k, cols, kv_rows, opt, mask=mask,
                              score=score)
    if masked:
      s = jnp.where(tiles.query_visibility(tile, cols, kv_rows, opt,
                                           mask=mask), s, -jnp.inf)
    # -- update m_i and l_i (Algorithm 1, lines 9-10)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 then.
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_ref)
    p = jnp.exp2(s - m_ref[:, None])
    l_i = alpha * l_i + jnp.sum(p, axis=1)  # of the undropped softmax
    # Dropped entries leave P here; 1/(1-rate) waits for the final rescale.
    p = tiles.apply_dropout(p, dropout, tile.stream, rows, cols, scale=False)
    # -- update the unnormalized output (Algorithm 1, line 10)
    v = tiles.load_tile(v_ref.at[kv_rows], cols, bound, head_dim)
    acc = alpha[:, None] * acc + plgpu.dot(
        p.astype(v.dtype), v, precision=tile.precision)
    return acc, m_new, l_i

  carry = (
      jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
      jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  bounds = tiles.clamp_to_segments(
      mask.key_blocks(tile.block, block_q, block_k), opt.segs)
  acc, m_i, l_i = tiles.visit_blocks(bounds, step, carry, **mask.key_loops())

  # -- one final rescale (Algorithm 1, line 12); rows that saw nothing give 0.
  out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
  if dropout.active:
    out = out * dropout.keep_scale
  tiles.store_tile(o_ref, out, rows, mask.seq_len_q, head_dim)
  # -- LSE in natural log (Algorithm 1, line 13); -inf for fully masked rows.
  lse = (m_i + jnp.log2(l_i)) * LN2
  plgpu.store(lse_ref, lse, mask=rows < mask.seq_len_q)


def forward(q, k, v, segments=None, alibi_slopes=None, bias=None,
            mask_array=None, seeds=None, *, mask: MaskRule, score: ScoreRule,
            dropout: DropoutRule, block_q: int, block_k: int, num_warps: int,
            num_stages: int, interpret: bool):
  """FlashAttention-2 forward.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K.
    segments: None, or (q_segments [B, T], kv_segments [B, S]) int32 (see
      `mask.lengths_to_segments`); required iff `mask.has_segments`.
    alibi_slopes: None, or [B, N] float32 (iff `score.alibi`).
    bias: None, or [Bm, Nm, Tm, Sm] float, each axis full or 1 (iff
      `score.has_bias`).
    mask_array: None, or [Bm, Nm, Tm, Sm] bool, each axis full or 1 (iff
      `mask.has_mask_array`).
    seeds: None, or [2] int32 dropout seeds (iff `dropout.active`).
    mask: the visibility rule, with T and S matching the shapes.
    score: scale, bias, soft cap and ALiBi of the logits.
    dropout: the dropout rate (LSE stays that of the undropped softmax).
  Returns:
    out [B, T, N, H] in q's dtype, lse [B, N, T] float32 (natural log).
  """
  batch, seq_len_q, num_heads, head_dim = q.shape
  g = tiles.query_major_grid(q, k, block_q, block_k)
  kernel = functools.partial(forward_kernel, mask=mask, score=score,
                             dropout=dropout, block_q=g.block_q,
                             block_k=g.block_k, head_dim=head_dim)
  specs, arrays = tiles.variant_inputs(
      mask=mask, score=score, dropout=dropout, segments=segments,
      alibi_slopes=alibi_slopes, bias=bias, mask_array=mask_array,
      seeds=seeds, block_q=g.block_q, block_k=g.block_k,
      seq_len_q=seq_len_q, seq_len_k=k.shape[1], group=g.group,
      query_major=True, q_block=g.q_block)
  return pl.pallas_call(
      kernel,
      grid=g.grid,
      in_specs=[g.q_spec, g.kv_spec, g.kv_spec, *specs],
      out_specs=[g.q_spec, g.stats_spec],
      out_shape=[
          out_struct(q.shape, q.dtype, q),
          out_struct((batch, num_heads, seq_len_q), jnp.float32, q),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="fa2_forward",
  )(q, k, v, *arrays)
