import dataclasses, functools, json, jax, jax.numpy as jnp, fa2_jax
from fa2_jax.bench import timing
B,N,H,T=1,16,128,16384
base=fa2_jax.default_block_sizes(H, jnp.bfloat16)
t64=dataclasses.replace(base, block_q=64, block_k=64, num_warps=4, num_stages=3)
def run(name, S, bs, **kw):
  sets=[]
  for seed in range(3):
    ks=jax.random.split(jax.random.key(seed),3)
    q=jax.random.normal(ks[0],(B,T,N,H),jnp.bfloat16)
    k=jax.random.normal(ks[1],(B,S,N,H),jnp.bfloat16)
    v=jax.random.normal(ks[2],(B,S,N,H),jnp.bfloat16)
    sets.append((q,k,v))
  f=jax.jit(functools.partial(fa2_jax.flash_attention, implementation="triton", block_sizes=bs, **kw))
  ms=timing.time_calls(f, sets)*1e3
  print(json.dumps(dict(name=name, S=S, ms=round(ms,4))), flush=True)
for tag, bs in (("128x128", base), ("64x64", t64)):
  run(f"window1k causal {tag}", T, bs, is_causal=True, local_window_size=(1024,0))
  run(f"noncausal S=1152 {tag}", 1152, bs)
  run(f"noncausal S=1024 {tag}", 1024, bs)
  run(f"noncausal S=2048 {tag}", 2048, bs)
  run(f"noncausal S=16384 {tag}", 16384, bs)
  run(f"causal {tag}", T, bs, is_causal=True)
