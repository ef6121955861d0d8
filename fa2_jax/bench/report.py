"""Markdown tables: TFLOP/s per implementation and the ratio to a baseline."""


def ratio_tables(rows, baseline="cudnn", ours="fa2-triton"):
  """One table over every (seq_len, head_dim, causal, pass) of the rows."""
  rows = [r for r in rows if "variant" not in r and "seq_len" in r]
  impls = sorted({r["impl"] for r in rows},
                 key=lambda n: (not n.startswith("fa2"), n))
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

  lines = ["| seq | head_dim | causal | pass | " + " | ".join(impls) +
           f" | {ours} / {baseline} |", "|---" * (len(impls) + 5) + "|"]
  for key in keys:
    mine, base = by.get((ours, *key)), by.get((baseline, *key))
    ratio = "-"
    if mine and base and "tflops" in mine and "tflops" in base:
      ratio = f"{mine['tflops'] / base['tflops']:.2f}"
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
