"""Attention speed and memory on this machine: fa2-jax against
jax.nn.dot_product_attention (cuDNN, XLA) and the installed peers.

    python -m fa2_jax.benchmark --output-dir results/     # the full sweep
    fa2-jax-benchmark --quick --output-dir /tmp/quick     # small; CPU-friendly
    python -m fa2_jax.benchmark --compare results/results.json --output-dir results/
    python -m fa2_jax.benchmark --variants --output-dir results/

Shapes as in the FlashAttention-2 paper: `--tokens` (batch x seqlen, 16k) at
`--hidden` (heads x head_dim, 2048), bf16, q/k/v [B, T, N, H]; `--batch` or
`--heads` fix those instead. FLOPs as in the paper (fwd 4 B N T^2 H, halved
when causal; bwd 2.5x, fwd+bwd 3.5x). Each case: two warm-up calls, then the
median over 5 runs of back-to-back calls cycling through 3 input sets, each
run at least 10 calls and 25 ms (`timing.MIN_RUN_S`); `--sustain-s` adds
untimed calls first; on a GPU each row records the SM clock and power after
its runs (`timing.gpu_clocks`). Cases
that fail or run out of memory are recorded with their error. Writes
results.json (every row, with the device and versions), speed_<pass>.png
(speed_fwd.png, speed_bwd.png, speed_fwd_bwd.png),
memory.png, and prints ratio tables against cuDNN.
"""
import argparse
import json
import math
import os
import platform
import sys

import jax
import jax.numpy as jnp

import fa2_jax
from fa2_jax.bench import implementations, memory, report, timing

TOKENS = 16384
HIDDEN = 2048
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
MEMORY_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK = dict(seq_lens=(128, 256), head_dims=(64,), tokens=512, hidden=128,
             memory_seq_lens=(128, 256), calls=2, trials=1, min_run_s=0.0)


def environment():
  device = jax.devices()[0]
  return dict(device=device.device_kind, platform=device.platform,
              jax=jax.__version__, jaxlib=jax.lib.__version__,
              fa2_jax=fa2_jax.__version__, python=platform.python_version())


def _packed_segments(batch, seq_len, num_docs=8):
  """[B, T] ids of `num_docs` equal documents per row."""
  doc = jnp.arange(seq_len, dtype=jnp.int32) * num_docs // seq_len
  return jnp.broadcast_to(doc, (batch, seq_len))


# Mask variants for `--variants`: name -> (batch, seq_len) -> mask kwargs.
VARIANTS = {
    "window-1k": lambda b, t: dict(local_window_size=(1024, 0)),
    "packed-8docs": lambda b, t: dict(q_segment_ids=_packed_segments(b, t)),
}


def run_case(impl, *, seq_len, head_dim, is_causal, pass_, dtype=jnp.bfloat16,
             block_sizes=None, tokens=TOKENS, hidden=HIDDEN, batch=None,
             heads=None, variant=None, interpret=False, calls=10, trials=5,
             min_run_s=timing.MIN_RUN_S, sustain_s=0.0):
  """Times one case; returns its row (with "error" if it failed).

  `variant` names an entry of VARIANTS; its TFLOP/s use the dense (or
  causal) FLOP count, so skipped blocks show up as speed. `calls`, `trials`,
  `min_run_s`, `sustain_s`: as in `timing.time_calls`.
  """
  batch = batch or max(1, tokens // seq_len)
  heads = heads or max(1, hidden // head_dim)
  row = dict(impl=impl, seq_len=seq_len, head_dim=head_dim, batch=batch,
             heads=heads, causal=is_causal, pass_=pass_,
             dtype=jnp.dtype(dtype).name, **environment())
  mask_kwargs = {}
  if sustain_s:
    row["sustain_s"] = sustain_s
  if variant is not None:
    row["variant"] = variant
    mask_kwargs = VARIANTS[variant](batch, seq_len)
  if block_sizes is not None:
    row["block_sizes"] = {k: getattr(block_sizes, k)
                          for k in block_sizes.__dataclass_fields__}
  try:
    fn = implementations.attention_fn(impl, is_causal=is_causal,
                                      interpret=interpret,
                                      block_sizes=block_sizes, **mask_kwargs)
    seconds = timing.time_case(fn, pass_, batch=batch, seq_len=seq_len,
                               heads=heads, head_dim=head_dim, dtype=dtype,
                               calls=calls, trials=trials,
                               min_run_s=min_run_s, sustain_s=sustain_s)
    row["ms"] = seconds * 1e3
    if not interpret:
      row.update(timing.gpu_clocks())
    row["tflops"] = timing.flops(batch, seq_len, heads, head_dim,
                                 is_causal=is_causal, pass_=pass_) / seconds / 1e12
  except Exception as e:  # recorded, not raised: OOM, unsupported, ...
    row["error"] = timing.describe(e)
  return row


class _Progress:
  """tqdm over the cases when installed; else a line per case to stderr."""

  def __init__(self, total, quiet=False):
    self.bar = None
    if not quiet:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
      except ImportError:
        pass
    self.quiet, self.done, self.total = quiet, 0, total

  def step(self, row):
    self.done += 1
    label = (f"{row['impl']} T={row['seq_len']} H={row['head_dim']} "
             f"{'causal' if row['causal'] else 'full'} {row['pass_']}")
    if self.bar is not None:
      self.bar.set_postfix_str(label, refresh=False)
      self.bar.update(1)
    elif not self.quiet:
      result = (f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row
                else row.get("error", "")[:60])
      print(f"[{self.done}/{self.total}] {label}: {result}", file=sys.stderr,
            flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def speed_sweep(impls, *, seq_lens, head_dims, causals, passes, **case_kwargs):
  cases = [(t, h, c, p, i) for t in seq_lens for h in head_dims
           for c in causals for p in passes for i in impls]
  progress, rows = _Progress(len(cases)), []
  for seq_len, head_dim, is_causal, pass_, impl in cases:
    row = run_case(impl, seq_len=seq_len, head_dim=head_dim,
                   is_causal=is_causal, pass_=pass_, **case_kwargs)
    rows.append(row)
    progress.step(row)
  progress.close()
  return rows


def variant_sweep(*, seq_lens, head_dims, passes, fa2_impls=("fa2-triton",),
                  **case_kwargs):
  """Causal attention with a window or packed documents vs plain causal, for
  the fa2 implementations `fa2_impls` (and cuDNN where it has the variant)."""
  rows = []
  for seq_len in seq_lens:
    for head_dim in head_dims:
      for pass_ in passes:
        for variant in (None, *VARIANTS):
          impls = list(fa2_impls) + (["cudnn"] if variant in (
              None, "window-1k") else [])
          for impl in impls:
            rows.append(run_case(impl, seq_len=seq_len, head_dim=head_dim,
                                 is_causal=True, pass_=pass_, variant=variant,
                                 **case_kwargs))
  return rows


def variant_table(rows):
  lines = ["| seq | head_dim | pass | impl | variant | ms | speed-up vs causal |",
           "|---|---|---|---|---|---|---|"]
  base = {(r["impl"], r["seq_len"], r["head_dim"], r["pass_"]): r
          for r in rows if "variant" not in r and "ms" in r}
  for r in rows:
    ref = base.get((r["impl"], r["seq_len"], r["head_dim"], r["pass_"]))
    speedup = f"{ref['ms'] / r['ms']:.1f}x" if ref and "ms" in r else "-"
    ms = f"{r['ms']:.2f}" if "ms" in r else r.get("error", "-")[:40]
    lines.append(f"| {r['seq_len']} | {r['head_dim']} | {r['pass_']} | "
                 f"{r['impl']} | {r.get('variant', 'causal')} | {ms} | "
                 f"{speedup} |")
  return "\n".join(lines)


def write_plots(rows, mem_rows, output_dir, passes, title=""):
  """speed_<pass>.png per pass ('+' spelled '_') and memory.png (unless
  mem_rows is None or empty)."""
  from fa2_jax.bench import plots  # matplotlib only when plotting
  os.makedirs(output_dir, exist_ok=True)
  for pass_ in passes:
    plots.speed_figure(rows, pass_, os.path.join(
        output_dir, f"speed_{pass_.replace('+', '_')}.png"), title)
  if mem_rows:
    plots.memory_figure(mem_rows, os.path.join(output_dir, "memory.png"),
                        title)


def show_results(rows, mem_rows, args, passes, title):
  """Writes the plots (`write_plots`) and prints the ratio tables of the
  speed rows and the memory table."""
  write_plots(rows, mem_rows, args.output_dir, passes, title)
  if rows:
    print(report.ratio_tables(rows, baseline=args.baseline, ours=args.ours))
  if mem_rows:
    print()
    print(report.memory_table(mem_rows))


def _ints(text):
  return tuple(int(x) for x in text.split(","))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="fa2-jax-benchmark", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--output-dir", default="benchmark-results")
  parser.add_argument("--impls", default=None,
                      help="comma-separated; default: every available one")
  parser.add_argument("--seq-lens", type=_ints, default=SEQ_LENS)
  parser.add_argument("--head-dims", type=_ints, default=HEAD_DIMS)
  parser.add_argument("--causal", choices=("both", "true", "false"),
                      default="both")
  parser.add_argument("--passes", default=",".join(timing.PASSES))
  parser.add_argument("--tokens", type=int, default=TOKENS)
  parser.add_argument("--hidden", type=int, default=HIDDEN)
  parser.add_argument("--batch", type=int, default=None,
                      help="fixed batch instead of tokens // seqlen")
  parser.add_argument("--heads", type=int, default=None,
                      help="fixed heads instead of hidden // head_dim")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--memory-seq-lens", type=_ints,
                      default=MEMORY_SEQ_LENS)
  parser.add_argument("--memory-head-dim", type=int, default=128)
  parser.add_argument("--sustain-s", type=float, default=0.0,
                      help="seconds of untimed calls before each case's "
                      "timed runs, so that it is timed at the clocks its own "
                      "load holds (an H100 under attention reaches its 700 W "
                      "cap within a second); default 0: after two warm-up "
                      "calls, at whatever clocks the last case left")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--no-speed", action="store_true")
  parser.add_argument("--quick", action="store_true",
                      help="a small sweep (interpret mode off a GPU)")
  parser.add_argument("--variants", action="store_true",
                      help="causal with a 1k window / 8 packed documents vs "
                      "plain causal, instead of the sweep")
  parser.add_argument("--compare", metavar="RESULTS_JSON", default=None,
                      help="no run: print the ratio tables of a results.json "
                      "and redraw its plots into --output-dir")
  parser.add_argument("--baseline", default="cudnn",
                      help="the ratio column's denominator: an implementation "
                      "or several, comma-separated (the fastest of them per "
                      "row), e.g. cudnn,tokamax-mosaic")
  parser.add_argument("--ours", default=None,
                      help="the ratio column's numerator (default fa2-mosaic "
                      "where the results have it, else fa2-triton)")
  args = parser.parse_args(argv)
  # The ratio column's names: implementations this benchmark knows, or, with
  # --compare, those in that file (a typo would leave the column all "-").
  known = set(implementations.names())
  args.compare_rows = None
  if args.compare:  # read once, here
    with open(args.compare) as f:
      args.compare_rows = json.load(f)["rows"]
    known |= {r["impl"] for r in args.compare_rows}
  for flag, value in (("--baseline", args.baseline), ("--ours", args.ours)):
    unknown = [n for n in (value.split(",") if value else []) if n not in known]
    if unknown:
      parser.error(f"{flag}: unknown implementation(s) {unknown}; expected "
                   f"names from {sorted(known)}")
  if not (math.isfinite(args.sustain_s) and args.sustain_s >= 0):
    parser.error(f"--sustain-s: expected finite seconds >= 0, got "
                 f"{args.sustain_s}")
  if args.quick:  # the quick sweep's sizes, where not given explicitly
    for key, value in QUICK.items():
      if key in vars(args) and getattr(args, key) == parser.get_default(key):
        setattr(args, key, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  # The memory workers are separate processes: this one must not reserve
  # most of the GPU up front (JAX's default), or they would starve.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.compare:
    rows = args.compare_rows
    mem = [r for r in rows if r.get("kind") == "memory"]
    speed = [r for r in rows if r.get("kind") != "memory"]
    show_results(speed, mem, args, timing.PASSES,
                 title=f"({rows[0].get('device', '')})" if rows else "")
    return rows
  on_gpu = jax.default_backend() == "gpu"
  interpret = not on_gpu
  calls, trials, min_run_s = ((QUICK["calls"], QUICK["trials"],
                               QUICK["min_run_s"]) if args.quick
                              else (10, 5, timing.MIN_RUN_S))
  impls = (args.impls.split(",") if args.impls
           else implementations.available(on_gpu))
  dtype = jnp.dtype(args.dtype)
  case_kwargs = dict(dtype=dtype, tokens=args.tokens, hidden=args.hidden,
                     batch=args.batch, heads=args.heads, interpret=interpret,
                     calls=calls, trials=trials, min_run_s=min_run_s,
                     sustain_s=args.sustain_s)
  passes = args.passes.split(",")
  os.makedirs(args.output_dir, exist_ok=True)
  env = environment()
  if args.variants:
    rows = variant_sweep(seq_lens=args.seq_lens, head_dims=args.head_dims,
                         passes=passes, fa2_impls=[
                             i for i in impls if i in implementations.FA2],
                         **case_kwargs)
    path = os.path.join(args.output_dir, "variants.json")
    with open(path, "w") as f:
      json.dump(dict(environment=env, rows=rows), f, indent=1)
    print(variant_table(rows))
    return rows
  causals = {"both": (False, True), "true": (True,), "false": (False,)}[
      args.causal]
  mem_rows = []
  if not args.no_memory:  # first, while this process holds little memory
    head_dim = args.memory_head_dim if not args.quick else args.head_dims[0]
    heads = args.heads or max(1, args.hidden // head_dim)
    mem_rows = memory.sweep(
        [i for i in impls if not i.endswith("mosaic")],
        seq_lens=args.memory_seq_lens, batch=args.batch or 1, heads=heads,
        head_dim=head_dim, is_causal=False, dtype=dtype, interpret=interpret)
    for r in mem_rows:
      r.update(kind="memory", **env)
  rows = []
  if not args.no_speed:
    rows += speed_sweep(impls, seq_lens=args.seq_lens,
                        head_dims=args.head_dims, causals=causals,
                        passes=passes, **case_kwargs)
  with open(os.path.join(args.output_dir, "results.json"), "w") as f:
    json.dump(dict(environment=env, rows=rows + mem_rows), f, indent=1)
  show_results(rows, mem_rows, args, passes,
               title=f"({env['device']}, {jnp.dtype(dtype).name})")
  return rows + mem_rows


if __name__ == "__main__":
  main()
