"""PNG figures in the style of the FlashAttention-2 paper: grouped bars of
TFLOP/s per sequence length, one bar per implementation, a panel per
(head_dim, causal) and a figure per pass; and the memory lines of the FA1
paper (peak bytes vs sequence length, log-log)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


_COLORS = {"fa2-triton": "tab:orange", "fa2-mosaic": "tab:red",
           "cudnn": "tab:green", "xla": "tab:brown",
           "jax-pallas-triton": "tab:purple", "jax-pallas-mosaic": "tab:pink",
           "tokamax-mosaic": "tab:blue", "tokamax-triton": "tab:cyan"}


def _color(impl):
  return _COLORS.get(impl, "tab:gray")


def _impl_order(rows):
  names = sorted({r["impl"] for r in rows})
  return sorted(names, key=lambda n: (not n.startswith("fa2"), n))


def speed_figure(rows, pass_, path, title=""):
  """Grouped bars for one pass; returns the path written, or None if no row
  of that pass exists."""
  rows = [r for r in rows if r.get("pass_") == pass_ and "variant" not in r]
  if not rows:
    return None
  head_dims = sorted({r["head_dim"] for r in rows})
  causals = sorted({r["causal"] for r in rows})
  impls = _impl_order(rows)
  seq_lens = sorted({r["seq_len"] for r in rows})
  fig, axes = plt.subplots(len(causals), len(head_dims),
                           figsize=(4.6 * len(head_dims), 3.2 * len(causals)),
                           squeeze=False)
  width = 0.8 / len(impls)
  panels = [(ax, h, c) for row, c in zip(axes, causals)
            for ax, h in zip(row, head_dims)]
  for ax, head_dim, causal in panels:
    for i, impl in enumerate(impls):
      by_len = {r["seq_len"]: r for r in rows if r["impl"] == impl
                and r["head_dim"] == head_dim and r["causal"] == causal}
      xs = [j + (i - (len(impls) - 1) / 2) * width
            for j in range(len(seq_lens))]
      heights = [by_len.get(t, {}).get("tflops", 0.0) for t in seq_lens]
      bars = ax.bar(xs, heights, width, label=impl, color=_color(impl))
      for bar, t in zip(bars, seq_lens):
        if "error" in by_len.get(t, {}):
          ax.annotate(_failure_label(by_len[t]["error"]),
                      (bar.get_x() + width / 2, 0), ha="center", va="bottom",
                      fontsize=6)
    ax.set_xticks(range(len(seq_lens)))
    ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 else str(t)
                        for t in seq_lens])
    ax.set_xlabel("sequence length")
    ax.set_title(f"head_dim {head_dim}, {'causal' if causal else 'non-causal'}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  for row in axes:
    row[0].set_ylabel("TFLOP/s")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"attention {pass_} {title}".strip(), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _failure_label(error):
  """'OOM' for out-of-memory rows, 'x' for any other failure."""
  return "OOM" if error.startswith("OOM") else "x"


def memory_figure(rows, path, title=""):
  """Peak memory lines, failed lengths marked at the top in the line's
  color; returns the path (a note in the figure when no implementation
  could be measured, e.g. on a CPU)."""
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  measured = [r for r in rows if "peak_bytes" in r]
  failed = [r for r in rows if "error" in r and "seq_len" in r]
  for impl in _impl_order(measured):
    pts = sorted((r["seq_len"], r["peak_bytes"]) for r in measured
                 if r["impl"] == impl)
    ours = impl.startswith("fa2")  # drawn on top, peers dashed: equal
    ax.plot([p[0] for p in pts], [p[1] / 2 ** 20 for p in pts],  # stay seen
            marker="o", label=impl, color=_color(impl),
            linestyle="-" if ours else "--", linewidth=2.5 if ours else 1.2,
            markersize=7 if ours else 4, zorder=3 if ours else 2)
    for r in failed:
      if r["impl"] == impl:
        ax.annotate(_failure_label(r["error"]), (r["seq_len"], 0.97),
                    xycoords=ax.get_xaxis_transform(), ha="center",
                    va="top", fontsize=7, color=_color(impl))
  if measured:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
  else:
    reasons = sorted({r.get("error", "")[:60] for r in rows})
    ax.text(0.5, 0.5, "not measured:\n" + "\n".join(reasons), ha="center",
            va="center", transform=ax.transAxes, fontsize=8)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("peak device memory, fwd+bwd (MiB)")
  ax.set_title(f"memory {title}".strip(), fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
