"""The attention implementations a benchmark can time, by name.

Each factory returns fn(q, k, v) -> out for q [B, T, N, H], k, v [B, S, K, H].
Peers that are not installed (or not importable here) are left out of
`available()`; an implementation that cannot run a case raises, and the
benchmark records the error.
"""
import functools
import importlib.util

import jax
import jax.numpy as jnp

import fa2_jax

FA2 = ("fa2-triton", "fa2-mosaic")
JAX_NN = ("cudnn", "xla")
PEERS = ("jax-pallas-triton", "jax-pallas-mosaic", "tokamax-mosaic",
         "tokamax-triton")


def _fa2(implementation, *, is_causal, interpret, block_sizes, **mask_kwargs):
  kw = dict(interpret=True) if interpret else {}
  return functools.partial(fa2_jax.flash_attention, is_causal=is_causal,
                           implementation=implementation,
                           block_sizes=block_sizes, **kw, **mask_kwargs)


def _jax_nn(implementation, *, is_causal, interpret, block_sizes,
            **mask_kwargs):
  del interpret, block_sizes
  if set(mask_kwargs) - {"local_window_size"}:
    raise NotImplementedError(
        f"jax.nn ({implementation}) has no {sorted(mask_kwargs)}")
  return functools.partial(jax.nn.dot_product_attention, is_causal=is_causal,
                           implementation=implementation, **mask_kwargs)


def _jax_pallas_triton(*, is_causal, interpret, block_sizes, **mask_kwargs):
  """JAX's bundled (deprecated) Pallas Triton attention: no GQA."""
  del block_sizes
  if mask_kwargs:
    raise NotImplementedError(f"jax-pallas-triton has no {sorted(mask_kwargs)}")
  from jax.experimental.pallas.ops.gpu import attention

  def fn(q, k, v):
    if k.shape[2] != q.shape[2]:
      raise NotImplementedError("jax-pallas-triton has no GQA")
    return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
                         causal=is_causal, interpret=interpret)
  return fn


def _jax_pallas_mosaic(*, is_causal, interpret, block_sizes, **mask_kwargs):
  """JAX's bundled Mosaic GPU (Hopper) attention."""
  del block_sizes
  if mask_kwargs or interpret:
    raise NotImplementedError("jax-pallas-mosaic: compiled, no mask options")
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

  def fn(q, k, v):
    if q.dtype != jnp.float16:
      raise NotImplementedError(f"jax-pallas-mosaic takes float16 only, got "
                                f"{q.dtype} (try --dtype float16)")
    # Its own benchmark's tiles: 64 query rows per compute warpgroup (two
    # per program), 128 keys; 64-wide backward tiles (it has no causal
    # backward, which is recorded as that row's error).
    config = mgpu.TuningConfig(block_q=64, block_kv=128,
                               max_concurrent_steps=2, causal=is_causal,
                               block_q_dkv=64, block_kv_dkv=64,
                               block_q_dq=64, block_kv_dq=64)
    # Its layout is [B, T, N, H] and its scale 1/sqrt(H), as here.
    return mgpu.attention(q, k, v, config)
  return fn


def _tokamax(implementation, *, is_causal, interpret, block_sizes,
             **mask_kwargs):
  """tokamax's attention, one named kernel ("mosaic": its Mosaic GPU one,
  "triton"): its default tries a list and would fall back silently."""
  del interpret, block_sizes
  if mask_kwargs:
    raise NotImplementedError(f"tokamax here takes no {sorted(mask_kwargs)}")
  import tokamax
  return functools.partial(tokamax.dot_product_attention, is_causal=is_causal,
                           implementation=implementation)


_FACTORIES = {
    "fa2-triton": functools.partial(_fa2, "triton"),
    "fa2-mosaic": functools.partial(_fa2, "mosaic"),
    "cudnn": functools.partial(_jax_nn, "cudnn"),
    "xla": functools.partial(_jax_nn, "xla"),
    "jax-pallas-triton": _jax_pallas_triton,
    "jax-pallas-mosaic": _jax_pallas_mosaic,
    "tokamax-mosaic": functools.partial(_tokamax, "mosaic"),
    "tokamax-triton": functools.partial(_tokamax, "triton"),
}


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def available(on_gpu: bool) -> list[str]:
  """Names worth timing here: ours and jax.nn always (a failing case is
  recorded), the peers when importable (the GPU-only ones on a GPU)."""
  names = list(FA2 + JAX_NN)
  if on_gpu and _importable("jax.experimental.pallas.ops.gpu.attention"):
    names.append("jax-pallas-triton")
  if on_gpu and _importable("jax.experimental.pallas.ops.gpu.attention_mgpu"):
    names.append("jax-pallas-mosaic")
  if on_gpu and _importable("tokamax"):
    names += ["tokamax-mosaic", "tokamax-triton"]
  return names


def names() -> tuple:
  """Every implementation name a benchmark can time (installed or not)."""
  return tuple(_FACTORIES)


def attention_fn(name: str, *, is_causal: bool, interpret: bool = False,
                 block_sizes=None, **mask_kwargs):
  """(q, k, v) -> out for an implementation name."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown implementation {name!r}; known: "
                     f"{sorted(_FACTORIES)}")
  return _FACTORIES[name](is_causal=is_causal, interpret=interpret,
                          block_sizes=block_sizes, **mask_kwargs)
