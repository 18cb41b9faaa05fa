"""Stage 01's figures: what each variant costs, memory against batch, and whether the
per-block costs add up (predicted vs measured, error by statistic).

Each function takes what the stage wrote (or returns) and gives a matplotlib ``Figure``;
reads and writes nothing itself (core/figures.py holds what the stages' figures share).
"""

from __future__ import annotations

from ..core import figures  # noqa: F401  # before pyplot: it picks the headless Agg backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# ---- 01_profiling ---------------------------------------------------------------------------------
def _variant_label(name: str) -> str:
    return name.split(":", 1)[1]


def variant_costs(rows: list[dict], batch: int, layer: int = 0,
                  title: str = "Cost of each sub-block variant") -> plt.Figure:
    """Prefill and decode ms of every variant at one layer and batch size (median, p10–p90
    whiskers), attention and FFN side by side, the parent's own sub-block hatched."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9), sharey=False)
    for ax, phase in zip(axes, ("prefill", "decode")):
        x, labels = 0, []
        for c, kind in enumerate(("attn", "ffn")):
            rs = [r for r in rows if r["layer"] == layer and r["sub_block"] == kind]
            for r in rs:
                mid = r[f"{phase}_ms@b{batch}"]
                lo, hi = r[f"{phase}_ms_p10@b{batch}"], r[f"{phase}_ms_p90@b{batch}"]
                ax.bar(x, mid, color=f"C{c}", hatch="//" if r["is_parent"] else None,
                       edgecolor="black" if r["is_parent"] else None,
                       yerr=[[max(mid - lo, 0)], [max(hi - mid, 0)]], capsize=2,
                       label=None if x else kind)
                labels.append((x, _variant_label(r["variant"])))
                x += 1
            x += 0.6
        ax.set_xticks([p for p, _ in labels], [t for _, t in labels], rotation=60, fontsize=8)
        ax.set_ylabel("ms per call")
        ax.set_title(f"{phase} · batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color="C0"), plt.Rectangle((0, 0), 1, 1, color="C1"),
               plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//")]
    fig.legend(handles, ["attention", "FFN", "parent's own"], loc="upper right", ncol=3, frameon=False)
    fig.suptitle(f"{title} (layer {layer}; whiskers p10–p90)", x=0.02, ha="left")
    fig.tight_layout()
    return fig


def cost_heatmap(rows: list[dict], batch_sizes: list[int], layer: int = 0,
                 title: str = "Cost relative to the parent's sub-block") -> plt.Figure:
    """Variants × metrics, each cell the variant's cost divided by the parent sub-block's (1.0 =
    as expensive as the parent; 0 = free). Shows where a variant saves: memory, prefill or decode."""
    metrics = ["params", "kv_bytes_per_token"] + [f"{p}_ms@b{b}" for b in batch_sizes
                                                  for p in ("prefill", "decode")]
    rs = [r for r in rows if r["layer"] == layer and r["sub_block"] in ("attn", "ffn")]
    parent = {k: next(r for r in rs if r["sub_block"] == k and r["is_parent"]) for k in ("attn", "ffn")}
    mat = np.full((len(rs), len(metrics)), np.nan)
    for i, r in enumerate(rs):
        for j, m in enumerate(metrics):
            ref = parent[r["sub_block"]][m]
            if ref:
                mat[i, j] = r[m] / ref
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) + 3, 0.32 * len(rs) + 1.4))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(1.2, float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.2),
                   aspect="auto")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(metrics)), [m.replace("_ms@", " ms @") for m in metrics], rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(rs)), [r["variant"] for r in rs], fontsize=8)
    ax.set_title(f"{title} (layer {layer}; blank: the parent has none, e.g. KV for a no-KV layer)")
    fig.colorbar(im, ax=ax, fraction=0.03, label="× parent sub-block")
    fig.tight_layout()
    return fig


def additivity_scatter(rows: list[dict], title: str = "Predicted (sum of sub-blocks) vs measured"
                       ) -> plt.Figure:
    """Predicted vs measured prefill ms, decode ms and decode speed-up over the parent, one marker
    per (child, batch size), with the y = x line and a ±10 % band."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    batches = sorted({r["batch"] for r in rows})
    panels = [("prefill", "_ms", "prefill ms"), ("decode", "_ms", "decode step ms"),
              ("decode", "_speedup", "decode speed-up vs parent")]
    for ax, (phase, suffix, label) in zip(axes, panels):
        for c, b in enumerate(batches):
            rs = [r for r in rows if r["batch"] == b]
            pred = np.array([r[f"pred_{phase}{suffix}"] for r in rs])
            meas = np.array([r[f"meas_{phase}{suffix}"] for r in rs])
            par = np.array([r["is_parent"] for r in rs], dtype=bool)
            ax.scatter(meas[~par], pred[~par], color=f"C{c}", s=22, label=f"batch {b}")
            ax.scatter(meas[par], pred[par], color=f"C{c}", marker="*", s=140, edgecolor="black",
                       label="parent" if c == 0 else None)
        vals = [r[f"{k}_{phase}{suffix}"] for r in rows for k in ("pred", "meas")]
        lo, hi = min(vals) * 0.85, max(vals) * 1.15
        line = np.linspace(lo, hi, 50)
        ax.plot(line, line, "k-", lw=1, label="y = x")
        ax.fill_between(line, line * 0.9, line * 1.1, color="0.85", zorder=0, label="±10 %")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout()
    return fig


def error_by_statistic(summaries: dict[str, dict], keys: tuple[str, ...] = (
        "prefill_median_rel_err", "decode_median_rel_err", "decode_speedup_median_rel_err"),
        title: str = "Median additivity error by how samples are summarised") -> plt.Figure:
    """Grouped bars: for each variant of the measurement (e.g. median / p10 / min, or hot vs
    rotated caches), the median relative errors, with the 10 % target line."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    names = list(summaries)
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        ax.bar(np.arange(len(names)) + j * w, [100 * summaries[n].get(k, np.nan) for n in names],
               width=w, label=k.replace("_median_rel_err", "").replace("_", " "))
    ax.axhline(10, color="C3", ls="--", lw=1, label="10 % target")
    ax.set_xticks(np.arange(len(names)) + w * (len(keys) - 1) / 2, names)
    ax.set_ylabel("median |pred − meas| / meas (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def memory_vs_batch(batches: list[int], curves: dict[str, list[float]],
                    title: str = "Memory of a child: weights + KV cache, against the batch size"
                    ) -> plt.Figure:
    """One line per named child: predicted memory in MiB (bytes in ``curves``) at each batch size.
    Where a line starts is its weights; its slope is the KV cache one more sequence adds, which
    is what fewer KV heads shrink."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for c, (name, values) in enumerate(curves.items()):
        ax.plot(batches, np.asarray(values, float) / 2**20, "o-", color=f"C{c % 10}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (sequences served at once)")
    ax.set_ylabel("weights + KV cache (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
