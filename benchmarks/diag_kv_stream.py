"""How fast can the Hopper forward's K/V stream run with no compute at all?

The unmasked forward reads, per query tile of `consumers * block_q` rows,
every key's K and V row: 4 * H bytes per key for 4 * rows * H FLOPs, so
1 / rows bytes per FLOP. At 128-row tiles and 600 TFLOP/s that is ~4.7 TB/s
from L2 into shared memory, which may be near what the L2 delivers (NOTES
item 67). This script runs the forward's own producer (`mt.kv_producer`:
same tiles, schedule, ring and TMA copies) against consumers that only wait
for each K and V slot and free it, and reports the stream's TB/s beside the
rate the real forward needs at its measured speed, each also in two-CTA
clusters that multicast K and V (`MosaicBlocks.cluster`: half the L2
reads). If the stream alone runs at barely more than the forward's need
and the cluster lifts both, the L2 was the limit; if the stream runs far
faster, it is not. On an H100 (NOTES item 68) the stream alone runs at
17.6-19.3 TB/s against the forward's 3.6-5.2: not the L2.

Usage (on the GPU): python benchmarks/diag_kv_stream.py [--out FILE]
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

import fa2_jax
from fa2_jax.bench import timing
from pallas_kernels import mosaic_tiles as mt
from pallas_kernels.mask import MaskRule

TOKENS, HIDDEN = 16384, 2048


def _consumer(wg, refs, scratch, *, tiles, mask, rows, block_k, stages):
  """Waits for each K and V slot of the CTA's tiles and frees it."""
  del wg, refs
  bars = scratch["bars"]

  def tile(t, coords, first):
    del t
    q_tile = coords[0]
    start, _, _, end = mask.key_blocks(q_tile, rows, block_k)

    def step(i, carry):
      slot = mt.slot_of(first + i, stages)
      plgpu.barrier_wait(bars["k_ready"].at[slot])
      plgpu.barrier_arrive(bars["k_free"].at[slot])
      plgpu.barrier_wait(bars["v_ready"].at[slot])
      plgpu.barrier_arrive(bars["v_free"].at[slot])
      return carry

    lax.fori_loop(0, end - start, step, jnp.int32(0))
    return first + end - start

  tiles.loop(tile, jnp.int32(0))


def kv_stream(k, v, *, seq_len_q: int, blocks: mt.MosaicBlocks,
              persistent: bool):
  """Streams K and V [B, S, N, H] as the forward over seq_len_q queries
  would (in two-CTA clusters sharing each block if `blocks.cluster` is 2);
  returns a dummy [num_ctas] output."""
  batch, seq_len_k, heads, head_dim = k.shape
  k, v = (mt.pad_tokens(x, mt.kv_rows(seq_len_k, blocks.block_k), head_dim)
          for x in (k, v))
  rows, cluster = blocks.consumers * blocks.block_q, blocks.cluster
  mask = MaskRule(seq_len_q=seq_len_q, seq_len_k=seq_len_k)
  tiles = mt.Tiles.make(
      mt.tile_costs(lambda i: mask.key_blocks(i, rows, blocks.block_k),
                    mt.round_up(seq_len_q, rows * cluster) // rows // cluster),
      heads, batch, persistent=persistent, cluster=cluster)
  ring, ring_bars = mt.kv_ring_scratch(mask, blocks.block_k, blocks.stages,
                                       head_dim, k.dtype, blocks.consumers,
                                       cluster)
  names = ["k", "v"] + tiles.input_names() + ["out"]

  def kernel(*args):
    refs, scratch = mt.named_refs(args, names)
    bound = tiles.bind(refs)
    mt.warp_specialize(
        functools.partial(_consumer, refs=refs, scratch=scratch, tiles=bound,
                          mask=mask, rows=rows, block_k=blocks.block_k,
                          stages=blocks.stages),
        lambda: mt.kv_producer(refs, scratch, mask=mask,
                               block_q=blocks.block_q, block_k=blocks.block_k,
                               stages=blocks.stages, group=1, tiles=bound,
                               consumers=blocks.consumers),
        blocks.consumers)

  out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((tiles.num_ctas,), jnp.int32),
      scratch_types=[dict(**ring, bars=ring_bars)],
      grid=(tiles.num_ctas,), grid_names=("cta",),
      num_threads=blocks.consumers + 1, thread_name="wg",
      compiler_params=mt.compiler_params(),
      **(dict(cluster=(cluster,), cluster_names=("cluster",))
         if cluster > 1 else {}))(k, v, *tiles.inputs())
  return out, tiles


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = []
  cases = [  # seq, head_dim, block_k, cluster
      (4096, 128, 128, 1), (4096, 128, 128, 2), (16384, 128, 128, 1),
      (16384, 128, 192, 1), (16384, 128, 192, 2), (4096, 64, 256, 1),
      (16384, 64, 256, 1)]
  for seq, head_dim, block_k, cluster in cases:
    heads, batch = HIDDEN // head_dim, TOKENS // seq
    blocks = mt.MosaicBlocks(block_k=block_k, cluster=cluster)
    rows = blocks.consumers * blocks.block_q
    _, k, v, _ = timing.inputs(batch, seq, heads, head_dim, jnp.bfloat16)
    for persistent in (True, False):
      step = jax.jit(lambda k, v, p=persistent, b=blocks, s=seq: kv_stream(
          k, v, seq_len_q=s, blocks=b, persistent=p)[0])
      sec = timing.time_calls(step, [(k, v)])
      streamed_rows = seq * (mt.round_up(seq, rows) // rows) * heads * batch
      stream_tbs = streamed_rows * 4 * head_dim / sec / 1e12
      fwd = functools.partial(fa2_jax.flash_attention, implementation="mosaic",
                              block_sizes=blocks)
      fwd_sec = timing.time_case(fwd, "fwd", batch=batch, seq_len=seq,
                                 heads=heads, head_dim=head_dim,
                                 dtype=jnp.bfloat16) if persistent else None
      row = dict(seq_len=seq, head_dim=head_dim, block_k=block_k,
                 cluster=cluster, rows_per_cta=rows, persistent=persistent,
                 stream_ms=sec * 1e3, stream_tb_s=stream_tbs,
                 stream_l2_tb_s=stream_tbs / cluster)
      if fwd_sec:
        flops = timing.flops(batch, seq, heads, head_dim, is_causal=False,
                             pass_="fwd")
        row.update(forward_ms=fwd_sec * 1e3,
                   forward_tflops=flops / fwd_sec / 1e12,
                   forward_needs_tb_s=(streamed_rows * 4 * head_dim
                                       / fwd_sec / 1e12))
      results.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind,
                     jax=jax.__version__, rows=results), f, indent=1)


if __name__ == "__main__":
  main()
