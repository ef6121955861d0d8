"""Pallas kernels of fa2-jax: FlashAttention-2 forward and backward.

Only kernels and their `pallas_call` wrappers live here; validation, defaults
and autodiff wiring live in `fa2_jax`. Nothing here imports `fa2_jax`.
"""
