"""Which implementation runs a call: "mosaic" (Hopper kernels), "triton"
(Pallas kernels through the Triton lowering, sm80+) or "xla" (reference).

`implementation=None` takes "mosaic" on a Hopper GPU when the Hopper kernels
support every argument and are the faster there, "triton" on other GPUs (or
for what "mosaic" lacks or runs slower), "xla" on the CPU. An explicit
"mosaic" that cannot run raises NotImplementedError naming why.

Where "mosaic" is slower or not measured faster (on an H100,
benchmarks/NOTES.md items 11 and 16): sequences under MOSAIC_MIN_SEQ_LEN
queries (the persistent forward made it faster from 512 on; shorter ones
were not measured). Segment ids (and lengths, which become segment ids)
run there too since the Hopper kernels skip the blocks of other documents
(item 23: 8 packed documents at 16k, forward 0.42 vs 0.52 ms at head_dim
128, 0.65 vs 0.69 at 64).
"""
import jax
import jax.numpy as jnp

from fa2_jax import validation
from pallas_kernels import mosaic_tiles

IMPLEMENTATIONS = ("triton", "mosaic", "xla")
MAX_KERNEL_HEAD_DIM = 256
MOSAIC_MIN_SEQ_LEN = 512


def gpu_compute_capability() -> str | None:
  """The default device's compute capability ("9.0"), None off CUDA GPUs."""
  if jax.default_backend() != "gpu":
    return None
  return getattr(jax.devices()[0], "compute_capability", None)


def is_hopper() -> bool:
  cc = gpu_compute_capability()
  return cc is not None and cc.split(".")[0] == "9"


def mosaic_unsupported(rules, *, dtype, head_dim: int) -> list:
  """What the Hopper kernels cannot run among one call's arguments (empty if
  they run all of it). `rules` is a `rules.Rules` or None (no variants)."""
  missing = []
  if jnp.dtype(dtype) not in map(jnp.dtype, mosaic_tiles.DTYPES):
    missing.append(f"dtype {jnp.dtype(dtype).name} (float16 and bfloat16 "
                   f"only)")
  if head_dim > mosaic_tiles.HEAD_DIMS[-1]:
    missing.append(f"head_dim {head_dim} (at most "
                   f"{mosaic_tiles.HEAD_DIMS[-1]})")
  if rules is not None:
    a = rules.arrays
    for name, present in (("bias", a["bias"] is not None),
                          ("mask", a["mask_array"] is not None),
                          ("alibi_slopes", a["alibi_slopes"] is not None),
                          ("dropout_rate > 0", rules.dropout.active)):
      if present:
        missing.append(name)
  return missing


def mosaic_is_faster(seq_len_q: int) -> bool:
  """Whether the Hopper kernels beat the Triton ones on such a call."""
  return seq_len_q >= MOSAIC_MIN_SEQ_LEN


def resolve(implementation, interpret, *, rules=None, dtype, head_dim: int,
            seq_len_q: int):
  """(implementation, interpret) for one call, validated."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS},"
                     f" got {implementation!r}")
  if interpret is not None:
    validation.check_bool("interpret", interpret)
  on_gpu = jax.default_backend() == "gpu"
  if implementation is None:
    if interpret or not on_gpu:
      implementation = "triton" if interpret else "xla"
    elif (is_hopper() and mosaic_is_faster(seq_len_q)
          and not mosaic_unsupported(rules, dtype=dtype, head_dim=head_dim)):
      implementation = "mosaic"
    else:
      implementation = "triton"
  if implementation == "xla":
    if interpret:
      raise ValueError("interpret=True applies to the Pallas implementations, "
                       "not implementation='xla'")
    return implementation, False
  if head_dim > MAX_KERNEL_HEAD_DIM:
    raise NotImplementedError(
        f"head_dim {head_dim} is not supported by the {implementation!r} "
        f"kernels (at most {MAX_KERNEL_HEAD_DIM}); use implementation='xla'")
  if jnp.dtype(dtype) == jnp.float64:
    raise NotImplementedError(
        f"float64 inputs are not supported by the {implementation!r} kernels;"
        f" use float32 or implementation='xla'")
  if implementation == "mosaic":
    _check_mosaic(interpret, rules, dtype, head_dim)
    return implementation, False
  if interpret is None:
    if not on_gpu:
      raise NotImplementedError(
          f"implementation='triton' compiles for a CUDA GPU, but JAX's default "
          f"backend is {jax.default_backend()!r}; pass interpret=True to run the"
          f" kernels in interpret mode, or implementation='xla'")
    interpret = False
  return implementation, interpret


def _check_mosaic(interpret, rules, dtype, head_dim: int):
  if interpret:
    raise NotImplementedError(
        "implementation='mosaic' cannot run in interpret mode (its wgmma and "
        "TMA have no interpreter); use implementation='triton' with "
        "interpret=True")
  if not is_hopper():
    where = gpu_compute_capability()
    where = (f"a GPU of compute capability {where}" if where else
             f"JAX's {jax.default_backend()!r} backend")
    raise NotImplementedError(
        f"implementation='mosaic' needs a Hopper GPU (compute capability 9.x),"
        f" found {where}; use implementation='triton' (sm80+) or 'xla'")
  missing = mosaic_unsupported(rules, dtype=dtype, head_dim=head_dim)
  if missing:
    raise NotImplementedError(
        f"implementation='mosaic' does not support: {', '.join(missing)}; "
        f"use implementation='triton' (or None, which picks it)")
