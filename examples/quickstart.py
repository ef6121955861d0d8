"""fa2-jax from import to gradient (a GPU compiles the kernels; a CPU
interprets them)."""
import jax
import jax.numpy as jnp

import fa2_jax

B, T, N, K, H = 2, 256, 8, 2, 64                  # GQA: 8 query, 2 kv heads
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, T, N, H), jnp.bfloat16)
k = jax.random.normal(kk, (B, T, K, H), jnp.bfloat16)
v = jax.random.normal(kv, (B, T, K, H), jnp.bfloat16)
interpret = None if jax.default_backend() == "gpu" else True


def loss(q, k, v):
  out = fa2_jax.flash_attention(q, k, v, is_causal=True, implementation="triton",
                                interpret=interpret)       # [B, T, N, H]
  return jnp.mean(out.astype(jnp.float32) ** 2)


value, (dq, dk, dv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
    q, k, v)
print(f"loss {value:.4f}; dq {dq.shape}, dk {dk.shape}, dv {dv.shape}")
