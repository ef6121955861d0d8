"""`flash_attention`: the public entry point, a drop-in for
`jax.nn.dot_product_attention`. Validates, picks defaults, dispatches."""
import jax

from fa2_jax import backends, rules, validation
from fa2_jax.autodiff import KernelConfig, kernel_attention
from fa2_jax.config import BlockSizes, default_block_sizes
from fa2_jax.reference import reference_attention
from pallas_kernels.mosaic_tiles import MosaicBlocks, default_mosaic_blocks


def _check_block_sizes(block_sizes, implementation):
  """The implementation `block_sizes` selects (its type names one), checked
  against an explicit `implementation`."""
  if block_sizes is None:
    return implementation
  kinds = {BlockSizes: "triton", MosaicBlocks: "mosaic"}
  kind = kinds.get(type(block_sizes))
  if kind is None:
    raise TypeError(f"block_sizes must be a fa2_jax.BlockSizes (triton), a "
                    f"fa2_jax.MosaicBlocks (mosaic) or None, got "
                    f"{type(block_sizes).__name__}")
  if implementation is not None and implementation != kind:
    raise ValueError(f"block_sizes is a {type(block_sizes).__name__}, tiles "
                     f"of the {kind!r} kernels, but implementation="
                     f"{implementation!r}")
  return kind if jax.default_backend() == "gpu" else implementation


def flash_attention(query, key, value, bias=None, mask=None, *, scale=None,
                    is_causal=False, query_seq_lengths=None,
                    key_value_seq_lengths=None, local_window_size=None,
                    q_segment_ids=None, kv_segment_ids=None,
                    causal_alignment="top_left", logits_soft_cap=None,
                    alibi_slopes=None, dropout_rate=0.0, dropout_rng=None,
                    broadcast_dropout=False, return_residual=False,
                    implementation=None, interpret=None, block_sizes=None):
  """Exact attention with FlashAttention-2 kernels: softmax(scale Q K^T) V.

  The layout and meaning follow `jax.nn.dot_product_attention`.

  Args:
    query: [B, T, N, H] float16, bfloat16 or float32.
    key, value: [B, S, K, H], same dtype; N a multiple of K (GQA/MQA): query
      head n reads kv head n // (N // K).
    bias: float, broadcastable to [B, N, T, S], added to the scaled logits,
      as jax.nn. Differentiable: dbias is dS summed over the broadcast axes;
      it costs one more kernel and a [B, N, T, S] float32 buffer, and runs
      only when the bias is differentiated.
    mask: bool, broadcastable to [B, N, T, S] (True = attend), as jax.nn;
      combined (and) with every other rule here.
    scale: logit scale; default 1 / sqrt(H).
    is_causal: query i sees keys j <= p(i), its position (below).
    query_seq_lengths, key_value_seq_lengths: [B] int, padding as in jax.nn:
      query rows past their length output 0 (lse -inf), keys past theirs are
      never seen.
    local_window_size: int w or (left, right): query i sees keys
      p(i) - left .. p(i) + right (w: left = right = w), as jax.nn; composes
      with is_causal. Blocks outside the band are skipped.
    q_segment_ids [B, T], kv_segment_ids [B, S]: int, packing: a query sees
      only keys with its id (kv_segment_ids defaults to q_segment_ids when
      T == S). Key blocks with no matching id are skipped.
    causal_alignment: where query i sits, p(i): "top_left" (default, jax.nn)
      p(i) = i; "bottom_right" (FlashAttention's convention for T != S, for
      chunked prefill and decoding) p(i) = i + S - T. Windows use p(i) too.

        is_causal, T=3, S=5:  top_left    bottom_right
                              x . . . .   x x x . .
                              x x . . .   x x x x .
                              x x x . .   x x x x x

      Rows that see no key (e.g. bottom_right with T > S) output 0.
    logits_soft_cap: None, or cap > 0: logits = cap * tanh(logits / cap),
      applied to the scaled logits before masking (Gemma 2).
    alibi_slopes: None, [N] or [B, N] float: adds -slope * |p(i) - j| to the
      logits after the soft cap (p(i) as above). The slopes are constants:
      no gradient flows to them.
    dropout_rate: probability of dropping an attention probability (kept
      ones are scaled by 1 / (1 - rate)); 0 (default) is no dropout.
    dropout_rng: a JAX PRNG key, required when dropout_rate > 0. The keep
      mask is a hash of (key, batch, head, row, column) computed inside the
      kernels, never stored; the same key drops the same entries on every
      implementation, including "xla", and lse stays that of the undropped
      softmax.
    broadcast_dropout: one keep mask shared by every batch element and head
      (Flax's `broadcast_dropout=True`); default False, a mask per (batch,
      head).
    return_residual: also return lse [B, N, T] float32, the natural-log
      log-sum-exp of the scaled logits of each query row (-inf for a row that
      sees no key). Differentiable.
    implementation: None picks: "mosaic" on a Hopper GPU when it supports
      the arguments and runs them faster (T >= 512, no segment ids:
      `fa2_jax.backends`), else "triton" on a GPU, else "xla". "mosaic": the
      Hopper kernels (Pallas Mosaic GPU: TMA, wgmma, warp specialization;
      sm90, float16/bfloat16; no bias, mask array, ALiBi or dropout: those
      raise NotImplementedError); "triton": Pallas kernels through the
      Triton lowering (sm80+, every variant); "xla": the plain-jnp
      reference (O(T S) memory).
    interpret: run the Triton-lowered kernels in interpret mode (CPU testing).
    block_sizes: tiles: a `fa2_jax.BlockSizes` (triton) or a
      `fa2_jax.MosaicBlocks` (mosaic; selects it when implementation is
      None); None takes the defaults.

  Returns:
    out [B, T, N, H] in the input dtype, or (out, lse) with return_residual.
  """
  dims = validation.check_qkv(query, key, value)
  return_residual = validation.check_bool("return_residual", return_residual)
  implementation = _check_block_sizes(block_sizes, implementation)
  r = rules.build_rules(
      dims, scale=scale, is_causal=is_causal,
      causal_alignment=causal_alignment, local_window_size=local_window_size,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
      mask=mask, logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng,
      broadcast_dropout=broadcast_dropout)
  implementation, interpret = backends.resolve(
      implementation, interpret, rules=r, dtype=query.dtype, head_dim=dims["H"],
      seq_len_q=dims["T"])

  if implementation == "xla":
    out, lse = reference_attention(query, key, value, mask=r.mask,
                                   score=r.score, dropout=r.dropout,
                                   **r.arrays)
  else:
    config = kernel_config(r.mask, r.score, r.dropout, implementation,
                           interpret, dims["H"], query.dtype, block_sizes)
    a = r.arrays
    out, lse = kernel_attention(query, key, value, a["bias"], a["segments"],
                                a["alibi_slopes"], a["mask_array"], a["seeds"],
                                config=config)
  return (out, lse) if return_residual else out


def kernel_config(mask, score, dropout, implementation: str, interpret: bool,
                  head_dim: int, dtype, block_sizes=None) -> KernelConfig:
  """The static configuration of the kernels for one call ("triton" or
  "mosaic"), with the default tiles where `block_sizes` is None."""
  triton_tiles = (block_sizes if isinstance(block_sizes, BlockSizes) else
                  default_block_sizes(head_dim, dtype,
                                      key_span=mask.key_span))
  mosaic_tiles = None
  if implementation == "mosaic":
    mosaic_tiles = (block_sizes if isinstance(block_sizes, MosaicBlocks)
                    else default_mosaic_blocks(
                        head_dim, masked=mask.cuts_many_blocks,
                        key_span=mask.key_span,
                        unmasked_len=mask.unmasked_len,
                        seq_len_q=mask.seq_len_q))
  return KernelConfig(mask=mask, score=score, dropout=dropout,
                      block_sizes=triton_tiles, interpret=interpret,
                      backend=implementation, mosaic_blocks=mosaic_tiles)
