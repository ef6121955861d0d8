"""Markdown tables: TFLOP/s per implementation and the ratio to a baseline."""


def ratio_tables(rows, baseline="cudnn", ours=None):
  """One table over every (seq_len, head_dim, causal, pass) of the rows.

  baseline: an implementation, or several comma-separated: the ratio is then
  to the fastest of them in that row (e.g. "cudnn,tokamax-mosaic", the
  issue's bar). ours: the implementation over it; fa2-mosaic where the rows
  have it, else fa2-triton."""
  rows = [r for r in rows if "variant" not in r and "seq_len" in r]
  impls = sorted({r["impl"] for r in rows},
                 key=lambda n: (not n.startswith("fa2"), n))
  if ours is None:
    ours = "fa2-mosaic" if any(
        r["impl"] == "fa2-mosaic" and "tflops" in r for r in rows) else (
            "fa2-triton")
  bases = baseline.split(",")
  order = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
  keys = sorted({(r["seq_len"], r["head_dim"], r["causal"], r["pass_"])
                 for r in rows}, key=lambda k: (*k[:3], order.get(k[3], 3)))
  by = {(r["impl"], r["seq_len"], r["head_dim"], r["causal"], r["pass_"]): r
        for r in rows}

  def cell(r):
    if r is None:
      return "-"
    if "tflops" in r:
      return f"{r['tflops']:.3g}"
    return "OOM" if r.get("error", "").startswith("OOM") else "x"

  title = baseline if len(bases) == 1 else f"best of {', '.join(bases)}"
  lines = ["| seq | head_dim | causal | pass | " + " | ".join(impls) +
           f" | {ours} / {title} |", "|---" * (len(impls) + 5) + "|"]
  for key in keys:
    mine = by.get((ours, *key))
    base = [r["tflops"] for r in (by.get((b, *key)) for b in bases)
            if r and "tflops" in r]
    ratio = "-"
    if mine and base and "tflops" in mine:
      ratio = f"{mine['tflops'] / max(base):.2f}"
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " +
                 " | ".join(cell(by.get((i, *key))) for i in impls) +
                 f" | {ratio} |")
  return "\n".join(lines)


def memory_table(rows):
  impls = sorted({r["impl"] for r in rows},
                 key=lambda n: (not n.startswith("fa2"), n))
  lens = sorted({r["seq_len"] for r in rows if "seq_len" in r})
  by = {(r["impl"], r.get("seq_len")): r for r in rows}
  lines = ["| seq | " + " | ".join(f"{i} (MiB)" for i in impls) + " |",
           "|---" * (len(impls) + 1) + "|"]
  for t in lens:
    cells = []
    for i in impls:
      r = by.get((i, t), {})
      cells.append(f"{r['peak_bytes'] / 2 ** 20:.0f}" if "peak_bytes" in r
                   else ("OOM" if r.get("error", "").startswith("OOM")
                         else "x"))
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
