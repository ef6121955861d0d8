"""The Triton kernels lowered for CUDA on any host, a CPU too.

Interpret mode (the CPU suite) runs the kernels' bodies through XLA, never
through Pallas's Triton lowering, so an op or a block shape that the Triton
lowering rejects would show only on a GPU. Under an abstract A100 or H100
(`jax.sharding.AbstractDevice`) the forward, backward and bias-gradient
kernels lower here as they would there (their numerics: the compiled suite).
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from fa2_jax import autodiff, rules, validation
from fa2_jax.attention import kernel_config

DEVICES = {"sm80": ("NVIDIA A100-SXM4-80GB", 108),
           "sm90": ("NVIDIA H100 80GB HBM3", 132)}


def _arrays(batch, seq_q, seq_k, heads, variants):
  """The variant arrays of `fa2_jax.flash_attention` as shapes."""
  shapes = dict(
      bias=((batch, heads, seq_q, seq_k), jnp.float32),
      mask=((batch, 1, seq_q, seq_k), jnp.bool_),
      alibi_slopes=((heads,), jnp.float32),
      q_segment_ids=((batch, seq_q), jnp.int32),
      kv_segment_ids=((batch, seq_k), jnp.int32),
      query_seq_lengths=((batch,), jnp.int32),
      key_value_seq_lengths=((batch,), jnp.int32))
  return {name: jax.ShapeDtypeStruct(*shapes[name]) for name in variants}


def _kernels(q, k, v, arrays, options):
  """The Triton forward, backward and (with a bias) bias-gradient launches
  of `fa2_jax.flash_attention(q, k, v, **arrays, **options)`."""
  r = rules.build_rules(validation.check_qkv(q, k, v), **arrays, **options)
  config = kernel_config(r.mask, r.score, r.dropout, "triton", False,
                         q.shape[-1], q.dtype)
  a = r.arrays
  named = dict(q=q, k=k, v=v, **autodiff._named(autodiff._variants(
      a["bias"], a["segments"], a["alibi_slopes"], a["mask_array"],
      a["seeds"])))
  out, lse = autodiff._forward_launch(named, config)
  grads = dict(named, do=out, lse=lse, delta=jnp.zeros_like(lse))
  result = (out, lse, *autodiff._backward_launch(grads, config))
  if a["bias"] is not None:
    result += autodiff._bias_gradient_launch(grads, config)
  return result


@pytest.mark.parametrize("arch", DEVICES)
@pytest.mark.parametrize("head_dim,dtype,variants,options", [
    (64, jnp.bfloat16, (), dict(is_causal=True, dropout_rate=0.1)),
    (128, jnp.float16, ("bias", "q_segment_ids", "kv_segment_ids"), {}),
    (256, jnp.float32, ("alibi_slopes",),
     dict(is_causal=True, local_window_size=(50, 20), logits_soft_cap=20.0)),
    (80, jnp.bfloat16, ("mask", "query_seq_lengths",
                        "key_value_seq_lengths"),
     dict(is_causal=True, causal_alignment="bottom_right")),
    (32, jnp.float16, (), {}),
])
def test_triton_kernels_lower_for_cuda(arch, head_dim, dtype, variants,
                                       options):
  batch, seq_q, seq_k, heads, kv_heads = 2, 1000, 777, 4, 2
  q = jax.ShapeDtypeStruct((batch, seq_q, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq_k, kv_heads, head_dim), dtype)
  if options.get("dropout_rate"):
    options = dict(options, dropout_rng=jax.random.key(0))
  kind, cores = DEVICES[arch]
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
          device_kind=kind, num_cores=cores, platform="cuda"))
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(functools.partial(_kernels, options=options)).trace(
        q, kv, kv, _arrays(batch, seq_q, seq_k, heads, variants)).lower(
            lowering_platforms=("cuda",)).as_text()
  # Forward, dK/dV and dQ (and the bias gradient): one Triton call each.
  assert text.count("custom_call @__gpu$xla.gpu.triton") == (
      4 if "bias" in variants else 3)
