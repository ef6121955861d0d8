"""`custom_vjp` wiring of the Triton-lowered kernels.

The forward saves (q, k, v, O, LSE); the backward computes
delta = rowsum(dO * O) (FA2 Algorithm 2, line 4) in one XLA fusion, subtracts
the LSE's own cotangent (dLSE/dS = P, so it folds into delta), and runs the
dK/dV and dQ kernels. Segment ids and the mask array are integer or boolean
inputs, and ALiBi slopes are constants (the API stops their gradient): none
gets a cotangent.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from fa2_jax.config import BlockSizes
from pallas_kernels import triton_backward, triton_forward
from pallas_kernels.mask import MaskRule
from pallas_kernels.scores import ScoreRule


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
  """Everything static about one attention call; hashable."""
  mask: MaskRule
  score: ScoreRule
  block_sizes: BlockSizes
  interpret: bool


def _forward(q, k, v, segments, slopes, mask_array, config: KernelConfig):
  bs = config.block_sizes
  return triton_forward.forward(
      q, k, v, segments, slopes, mask_array, mask=config.mask, score=config.score,
      block_q=bs.block_q, block_k=bs.block_k, num_warps=bs.num_warps,
      num_stages=bs.num_stages, interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def triton_attention(q, k, v, segments, slopes, mask_array,
                     config: KernelConfig):
  """Differentiable FA2 attention: returns (out [B,T,N,H], lse [B,N,T]).

  `segments` is None or (q_segments [B, T], kv_segments [B, S]) int32;
  `slopes` None or [B, N] float32 ALiBi slopes; `mask_array` None or
  [Bm, Nm, Tm, Sm] bool.
  """
  return _forward(q, k, v, segments, slopes, mask_array, config)


def _attention_fwd(q, k, v, segments, slopes, mask_array,
                   config: KernelConfig):
  out, lse = _forward(q, k, v, segments, slopes, mask_array, config)
  return (out, lse), (q, k, v, segments, slopes, mask_array, out, lse)


def _attention_bwd(config: KernelConfig, residuals, cotangents):
  q, k, v, segments, slopes, mask_array, out, lse = residuals
  d_out, d_lse = cotangents
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  delta = jnp.transpose(delta, (0, 2, 1)) - d_lse  # [B, N, T]
  bs = config.block_sizes
  dq, dk, dv = triton_backward.backward(
      q, k, v, d_out.astype(q.dtype), lse, delta, segments, slopes,
      mask_array, mask=config.mask,
      score=config.score, block_q_dkv=bs.block_q_dkv,
      block_k_dkv=bs.block_k_dkv, block_q_dq=bs.block_q_dq,
      block_k_dq=bs.block_k_dq, num_warps=bs.num_warps_bwd,
      num_stages=bs.num_stages_bwd, interpret=config.interpret)
  return dq, dk, dv, None, None, None


triton_attention.defvjp(_attention_fwd, _attention_bwd)
