"""`custom_vjp` wiring of the Pallas kernels (Triton-lowered or Mosaic GPU).

The forward saves (q, k, v, O, LSE); the backward computes
delta = rowsum(dO * O) (FA2 Algorithm 2, line 4) in one XLA fusion, subtracts
the LSE's own cotangent (dLSE/dS = P, so it folds into delta), and runs the
dK/dV and dQ kernels. The Hopper backward, where the LSE has no cotangent
and no bias gradient is asked for, takes O instead and computes delta
itself (`mosaic_backward.backward`). Segment ids, the mask array and the
dropout seeds are integer or boolean inputs, and ALiBi slopes are constants
(the API stops their gradient): none gets a cotangent.

The bias's gradient (dS summed over its broadcast axes) costs a third kernel
and a [B, N, T, S] float32 buffer, so it runs only when the bias is being
differentiated: the rule uses symbolic zeros to see whether it is.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from fa2_jax import partitioning
from fa2_jax.config import BlockSizes
from pallas_kernels import (mosaic_backward, mosaic_forward, triton_backward,
                            triton_forward)
from pallas_kernels.dropout import DropoutRule
from pallas_kernels.mask import MaskRule
from pallas_kernels.mosaic_tiles import MosaicBlocks
from pallas_kernels.outputs import row_delta
from pallas_kernels.scores import ScoreRule


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
  """Everything static about one attention call; hashable.

  backend: "triton" or "mosaic" (the Hopper kernels, with `mosaic_blocks`).
  """
  mask: MaskRule
  score: ScoreRule
  dropout: DropoutRule
  block_sizes: BlockSizes
  interpret: bool
  backend: str = "triton"
  mosaic_blocks: MosaicBlocks | None = None

  def rules(self):
    return dict(mask=self.mask, score=self.score, dropout=self.dropout,
                interpret=self.interpret)


def _segments(a):
  """(q_segments, kv_segments) from a launch's named arrays, or None."""
  if a.get("q_segments") is None:
    return None
  return a["q_segments"], a["kv_segments"]


def _kernel_variants(a):
  """The kernels' optional arrays by keyword, from a launch's named arrays."""
  return dict(bias=a.get("bias"), segments=_segments(a),
              alibi_slopes=a.get("alibi_slopes"),
              mask_array=a.get("mask_array"), seeds=a.get("seeds"))


def _named(variants):
  """A launch's named optional arrays, from `variants` (as run_forward's)."""
  segments = variants.get("segments") or (None, None)
  return dict(bias=variants.get("bias"), q_segments=segments[0],
              kv_segments=segments[1],
              alibi_slopes=variants.get("alibi_slopes"),
              mask_array=variants.get("mask_array"),
              seeds=variants.get("seeds"))


def _backward_params(variants, config: KernelConfig):
  bs = config.block_sizes
  return dict(num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_bwd,
              **variants, **config.rules())


def _mosaic_rules(a, config: KernelConfig):
  return dict(segments=_segments(a), mask=config.mask, score=config.score,
              blocks=config.mosaic_blocks)


def _forward_launch(a, config: KernelConfig):
  if config.backend == "mosaic":
    return mosaic_forward.forward(a["q"], a["k"], a["v"],
                                  **_mosaic_rules(a, config))
  bs = config.block_sizes
  return triton_forward.forward(
      a["q"], a["k"], a["v"], **_kernel_variants(a), block_q=bs.block_q,
      block_k=bs.block_k, num_warps=bs.num_warps, num_stages=bs.num_stages,
      **config.rules())


def _backward_launch(a, config: KernelConfig):
  if config.backend == "mosaic":
    return mosaic_backward.backward(
        a["q"], a["k"], a["v"], a["do"], a["lse"], a.get("delta"),
        out=a.get("out"), **_mosaic_rules(a, config))
  bs = config.block_sizes
  return triton_backward.backward(
      a["q"], a["k"], a["v"], a["do"], a["lse"], a["delta"],
      block_q_dkv=bs.block_q_dkv, block_k_dkv=bs.block_k_dkv,
      block_q_dq=bs.block_q_dq, block_k_dq=bs.block_k_dq,
      **_backward_params(_kernel_variants(a), config))


def _bias_gradient_launch(a, config: KernelConfig):
  bs = config.block_sizes
  return (triton_backward.bias_gradient(
      a["q"], a["k"], a["v"], a["do"], a["lse"], a["delta"],
      block_q=bs.block_q_dq, block_k=bs.block_k_dq,
      **_backward_params(_kernel_variants(a), config)),)


def run_forward(q, k, v, variants, config: KernelConfig):
  """(out, lse) from the forward kernel; `variants` holds its optional arrays
  by keyword (bias, segments, alibi_slopes, mask_array, seeds). Sharded over
  batch and heads under jit (fa2_jax.partitioning)."""
  return partitioning.launch(_forward_launch, config,
                             dict(q=q, k=k, v=v, **_named(variants)),
                             outputs=("out", "lse"))


def run_backward(q, k, v, do, lse, delta, variants, config: KernelConfig,
                 out=None):
  """(dq, dk, dv) from the backward kernels, given the LSE and
  delta = rowsum(dO O) [B, N, T] (possibly of a larger attention: ring);
  or, on the Mosaic backend, delta None and the forward's `out`: the
  kernels compute it."""
  return partitioning.launch(
      _backward_launch, config,
      dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, out=out,
           **_named(variants)),
      outputs=("dq", "dk", "dv"))


def run_bias_gradient(q, k, v, do, lse, delta, variants, config: KernelConfig):
  """dS [B, N, T, S] float32 (the bias gradient before its broadcast sums)."""
  (ds,) = partitioning.launch(
      _bias_gradient_launch, config,
      dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, **_named(variants)),
      outputs=("scores",))
  return ds


def _variants(bias, segments, slopes, mask_array, seeds):
  return dict(bias=bias, segments=segments, alibi_slopes=slopes,
              mask_array=mask_array, seeds=seeds)


@functools.partial(jax.custom_vjp, nondiff_argnames=("config",))
def kernel_attention(q, k, v, bias, segments, slopes, mask_array, seeds,
                     config: KernelConfig):
  """Differentiable FA2 attention: returns (out [B,T,N,H], lse [B,N,T]).

  `bias` is None or [Bm, Nm, Tm, Sm] float (each axis full or 1);
  `segments` None or (q_segments [B, T], kv_segments [B, S]) int32;
  `slopes` None or [B, N] float32 ALiBi slopes; `mask_array` None or
  [Bm, Nm, Tm, Sm] bool; `seeds` None or [2] int32 dropout seeds.
  """
  return run_forward(q, k, v, _variants(bias, segments, slopes, mask_array,
                                        seeds), config)


def _value(primal):
  return jax.tree.map(lambda x: x.value, primal,
                      is_leaf=lambda x: hasattr(x, "perturbed"))


def _attention_fwd(q, k, v, bias, segments, slopes, mask_array, seeds,
                   config: KernelConfig):
  bias_grad = bias is not None and bias.perturbed
  q, k, v, bias, segments, slopes, mask_array, seeds = _value(
      (q, k, v, bias, segments, slopes, mask_array, seeds))
  variants = _variants(bias, segments, slopes, mask_array, seeds)
  out, lse = run_forward(q, k, v, variants, config)
  # Saved twice when differentiated: the pytree structure (None or not) is
  # static, so the backward knows whether to run the dS kernel.
  grad_bias = bias if bias_grad else None
  return (out, lse), (q, k, v, variants, out, lse, grad_bias)


def _attention_bwd(config: KernelConfig, residuals, cotangents):
  q, k, v, variants, out, lse, grad_bias = residuals
  d_out, d_lse = cotangents
  if isinstance(d_out, SymbolicZero):
    d_out = jnp.zeros(out.shape, out.dtype)
  d_out = d_out.astype(q.dtype)
  if config.backend == "mosaic" and isinstance(d_lse, SymbolicZero):
    # The Hopper backward computes delta itself, in its dQ kernel where it
    # can (one pass over O and dO fewer). It takes no bias, so no bias
    # gradient needs delta here.
    delta, given_out = None, out
  else:
    delta, given_out = row_delta(out, d_out), None
    if not isinstance(d_lse, SymbolicZero):
      delta = delta - d_lse
  args = (q, k, v, d_out, lse, delta)
  dq, dk, dv = run_backward(*args, variants, config, out=given_out)
  d_bias = None
  if grad_bias is not None:
    ds = run_bias_gradient(*args, variants, config)
    axes = tuple(a for a in range(4) if grad_bias.shape[a] == 1 != ds.shape[a])
    d_bias = jnp.sum(ds, axis=axes, keepdims=True).astype(grad_bias.dtype)
  return dq, dk, dv, d_bias, None, None, None, None


kernel_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)
