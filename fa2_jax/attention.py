"""`flash_attention`: the public entry point, a drop-in for
`jax.nn.dot_product_attention`. Validates, picks defaults, dispatches."""
import jax

from fa2_jax import validation
from fa2_jax.autodiff import KernelConfig, triton_attention
from fa2_jax.config import BlockSizes, default_block_sizes
from fa2_jax.reference import attention_reference

IMPLEMENTATIONS = ("triton", "mosaic", "xla")
MAX_KERNEL_HEAD_DIM = 256


def _resolve_implementation(implementation, interpret):
  """The implementation to run and whether its kernels are interpreted."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS},"
                     f" got {implementation!r}")
  if interpret is not None:
    validation.check_bool("interpret", interpret)
  on_gpu = jax.default_backend() == "gpu"
  if implementation is None:
    implementation = "triton" if (on_gpu or interpret) else "xla"
  if implementation == "mosaic":
    raise NotImplementedError(
        "implementation='mosaic' (the Hopper kernels) is not available yet; "
        "use implementation='triton' or 'xla'")
  if implementation == "xla":
    if interpret:
      raise ValueError("interpret=True applies to the Pallas implementations, "
                       "not implementation='xla'")
    return implementation, False
  if interpret is None:
    if not on_gpu:
      raise NotImplementedError(
          f"implementation='triton' compiles for a CUDA GPU, but JAX's default "
          f"backend is {jax.default_backend()!r}; pass interpret=True to run the"
          f" kernels in interpret mode, or implementation='xla'")
    interpret = False
  return implementation, interpret


def flash_attention(query, key, value, bias=None, mask=None, *, scale=None,
                    is_causal=False, query_seq_lengths=None,
                    key_value_seq_lengths=None, local_window_size=None,
                    return_residual=False, implementation=None, interpret=None,
                    block_sizes=None):
  """Exact attention with FlashAttention-2 kernels: softmax(scale Q K^T) V.

  The layout and meaning follow `jax.nn.dot_product_attention`.

  Args:
    query: [B, T, N, H] float16, bfloat16 or float32.
    key, value: [B, S, K, H], same dtype; N a multiple of K (GQA/MQA): query
      head n reads kv head n // (N // K).
    bias, mask, query_seq_lengths, key_value_seq_lengths, local_window_size:
      not implemented yet; anything but None raises NotImplementedError.
    scale: logit scale; default 1 / sqrt(H).
    is_causal: query i sees keys j <= i (top-left, as jax.nn). For T != S:

        T=3, S=5 (x = attends)    T=5, S=3
          x . . . .                 x . .
          x x . . .                 x x .
          x x x . .                 x x x
                                    x x x
                                    x x x
    return_residual: also return lse [B, N, T] float32, the natural-log
      log-sum-exp of the scaled logits of each query row (-inf for a row that
      sees no key). Differentiable.
    implementation: None (the Pallas kernels on a GPU, else "xla"), "triton"
      (Pallas kernels through the Triton lowering, sm80+), "mosaic" (Hopper
      kernels: not available yet), "xla" (the plain-jnp reference, O(T S)
      memory).
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    block_sizes: a `fa2_jax.BlockSizes`; None takes `default_block_sizes`.

  Returns:
    out [B, T, N, H] in the input dtype, or (out, lse) with return_residual.
  """
  for name, arg in (("bias", bias), ("mask", mask),
                    ("query_seq_lengths", query_seq_lengths),
                    ("key_value_seq_lengths", key_value_seq_lengths),
                    ("local_window_size", local_window_size)):
    if arg is not None:
      raise NotImplementedError(f"{name} is not supported yet (got a "
                                f"{type(arg).__name__}); pass None")
  dims = validation.check_qkv(query, key, value)
  scale = validation.check_scale(scale, dims["H"])
  is_causal = validation.check_bool("is_causal", is_causal)
  return_residual = validation.check_bool("return_residual", return_residual)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a fa2_jax.BlockSizes or None, got "
                    f"{type(block_sizes).__name__}")
  implementation, interpret = _resolve_implementation(implementation, interpret)

  if implementation == "xla":
    out, lse = attention_reference(query, key, value, scale=scale,
                                   is_causal=is_causal)
  else:
    if dims["H"] > MAX_KERNEL_HEAD_DIM:
      raise NotImplementedError(
          f"head_dim {dims['H']} is not supported by the {implementation!r} "
          f"kernels (at most {MAX_KERNEL_HEAD_DIM}); use implementation='xla'")
    if query.dtype == "float64":
      raise NotImplementedError(
          f"float64 inputs are not supported by the {implementation!r} kernels;"
          f" use float32 or implementation='xla'")
    if block_sizes is None:
      block_sizes = default_block_sizes(dims["H"], query.dtype)
    config = KernelConfig(scale=scale, is_causal=is_causal,
                          block_sizes=block_sizes, interpret=interpret)
    out, lse = triton_attention(query, key, value, config=config)
  return (out, lse) if return_residual else out
