"""Figures: privacy–utility curves from table3.csv and the synthesis funnel from the stage stats.

    privcode figures --table3 results/table3.csv --table5 results/table5.csv --synth results/synth --out results/figures

- privacy_utility.png: pass@1 vs ε, one panel per (model, benchmark column), one line per method.
  Methods with ε = 0 (PreCode: no private data) or ε = ∞ (NonDPFT: no DP) have no place on the ε axis
  and are drawn as dashed horizontal reference lines. With --table5, its ε-sweep rows (`sweep` =
  epsilon: PrivCode at more ε) are more points on their method's line. Where the table has a score's 95% interval
  (`<column>_lo`, `<column>_hi`), DP points carry it as error bars and reference lines as a band.
- funnel.png: for each synthesis run `results/synth/<junior>/<variant>/eps<ε>/`, how many programs
  survive each step: generated (generated/stats.json `prompts`) → with code (`with_code`) → executed OK
  (exec/stats.json `n_kept`) → round-trip kept (roundtrip/stats.json `kept`). A missing stage is
  left out of that run's bars.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_file, read_json

ID_COLUMNS = ("sweep", "value", "model", "method", "tag", "epsilon", "delta", "prompt", "note")
FUNNEL_STEPS = [("generated", "prompts", "generated"), ("generated", "with_code", "with code"),
                ("exec", "n_kept", "executed OK"), ("roundtrip", "kept", "round-trip kept")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png) -> Path:
    out = Path(out_png)
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=150, bbox_inches="tight")
    return out


def _eps(x) -> float:
    return math.inf if str(x).lower() in ("inf", "infinity") else float(x)


def utility_points(table3_csv, table5_csv=None):
    """The points of the privacy-utility figure: table3's rows, plus table5's ε-sweep rows (a method at
    an ε that table3 already has keeps table3's row). ε as float (inf for ∞)."""
    import pandas as pd

    df = pd.read_csv(table3_csv, dtype={"epsilon": str})
    if df.empty:
        raise PrivcodeError("empty table", path=table3_csv)
    df["epsilon"] = df["epsilon"].map(_eps)
    if table5_csv is not None:
        t5 = pd.read_csv(table5_csv, dtype={"epsilon": str, "value": str})
        if "sweep" not in t5.columns:
            raise PrivcodeError("not a table5 (no 'sweep' column)", path=table5_csv)
        t5 = t5[t5["sweep"] == "epsilon"].drop(columns=["sweep", "value"])
        if not t5.empty:
            t5["epsilon"] = t5["epsilon"].map(_eps)
            seen = set(zip(df["model"], df["method"], df["epsilon"].round(2)))
            new = t5[[k not in seen for k in zip(t5["model"], t5["method"], t5["epsilon"].round(2))]]
            df = pd.concat([df, new[[c for c in new.columns if c in df.columns]]], ignore_index=True)
    return df


def privacy_utility(table3_csv, out_png, metrics: list[str] | None = None, table5_csv=None) -> Path:
    """pass@1 vs ε: a line per DP method, dashed horizontal lines for ε = 0 / ε = ∞ methods."""
    import pandas as pd

    from privcode.report import METHOD_ORDER

    df = utility_points(table3_csv, table5_csv)
    metrics = metrics or [c for c in df.columns if c not in ID_COLUMNS and not c.endswith(("_lo", "_hi"))
                          and pd.api.types.is_numeric_dtype(df[c])]
    if not metrics:
        raise PrivcodeError("no score columns", path=table3_csv)
    models = list(dict.fromkeys(df["model"]))
    methods = sorted(dict.fromkeys(df["method"]), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
    plt = _plt()
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        sub = df[df["model"] == model]
        finite = sub["epsilon"][(sub["epsilon"] > 0) & (sub["epsilon"] < math.inf)]
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for m in methods:
                rows = sub[(sub["method"] == m) & sub[metric].notna()]
                if rows.empty:
                    continue
                dp = rows[(rows["epsilon"] > 0) & (rows["epsilon"] < math.inf)].sort_values("epsilon")
                ref = rows[~rows.index.isin(dp.index)]
                ci = f"{metric}_lo" in rows and f"{metric}_hi" in rows
                if not dp.empty:
                    ax.plot(dp["epsilon"], dp[metric], marker="o", color=colors[m], label=m)
                    if ci:
                        ax.errorbar(dp["epsilon"], dp[metric], fmt="none", ecolor=colors[m], capsize=3, lw=1,
                                    yerr=[(dp[metric] - dp[f"{metric}_lo"]).fillna(0),
                                          (dp[f"{metric}_hi"] - dp[metric]).fillna(0)])
                for _, r in ref.iterrows():
                    e = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
                    if ci and not (math.isnan(r[f"{metric}_lo"]) or math.isnan(r[f"{metric}_hi"])):
                        ax.axhspan(r[f"{metric}_lo"], r[f"{metric}_hi"], color=colors[m], alpha=0.08, lw=0)
                    ax.axhline(r[metric], ls="--", lw=1.2, color=colors[m], label=f"{m} (ε = {e})")
            if len(finite):
                lo, hi = float(finite.min()), float(finite.max())
                if hi / lo >= 10:
                    ax.set_xscale("log")
                pad = 0.25 * (hi - lo) if hi > lo else 0.5 * lo
                ax.set_xlim(lo - pad if hi / lo < 10 else lo / 1.5, hi + pad if hi / lo < 10 else hi * 1.5)
                ticks = sorted(set(float(e) for e in finite))
                if len(ticks) <= 8:
                    ax.minorticks_off()
                    ax.set_xticks(ticks, [f"{e:.4g}" for e in ticks])
            else:
                ax.set_xlim(0.5, 10)
            top = max(sub[metric].max(), sub[f"{metric}_hi"].max() if f"{metric}_hi" in sub else 0)
            ax.set_ylim(0, (top * 1.15 if top > 0 else 1.0))
            ax.set_xlabel("ε (per record, from privacy.json)")
            ax.set_ylabel(f"{metric} pass@1 (%)")
            ax.set_title(f"{model} — {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = _save(fig, out_png)
    plt.close(fig)
    return out


def funnel_counts(synth_dir) -> dict:
    """{step label: count} for one synthesis run directory (steps whose stats.json is missing are left out)."""
    d = Path(synth_dir)
    out = {}
    for stage, key, label in FUNNEL_STEPS:
        p = d / stage / "stats.json"
        if p.exists():
            s = read_json(p)
            if key not in s:
                raise PrivcodeError("missing field", path=p, field=key)
            out[label] = int(s[key])
    return out


def find_synth_runs(synth_root) -> list[Path]:
    """Run directories under `root` (e.g. `<model>/<variant>/<eps>/`) that hold at least one
    stage's stats.json."""
    root = Path(synth_root)
    return sorted({p.parent.parent for stage in ("generated", "exec", "roundtrip")
                   for p in root.glob(f"**/{stage}/stats.json")})


def funnel(synth_dirs, out_png) -> Path:
    """Grouped bars: survivors of each step per run, labelled with the count and % of generated."""
    import numpy as np

    runs = [(f"{Path(d).parent.name}/{Path(d).name}", funnel_counts(d)) for d in synth_dirs]
    runs = [(n, c) for n, c in runs if c]
    if not runs:
        raise PrivcodeError("no synthesis stats.json found")
    labels = [lab for _, _, lab in FUNNEL_STEPS]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(labels) + 0.6 * len(runs)), 4.2))
    width = 0.8 / len(runs)
    x = np.arange(len(labels))
    ymax = max(v for _, c in runs for v in c.values())
    for k, (name, counts) in enumerate(runs):
        xs = [x[i] - 0.4 + width * (k + 0.5) for i, lab in enumerate(labels) if lab in counts]
        ys = [counts[lab] for lab in labels if lab in counts]
        bars = ax.bar(xs, ys, width=width * 0.95, label=name)
        base = counts.get("generated")
        for b, y in zip(bars, ys):
            txt = f"{y}" + (f"\n{100 * y / base:.0f}%" if base else "")
            ax.text(b.get_x() + b.get_width() / 2, y + ymax * 0.01, txt, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("programs")
    ax.set_ylim(0, ymax * 1.22)
    ax.set_title("Synthesis funnel")
    ax.legend(fontsize=8, title="model/run", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, out_png)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table3", type=Path, help="results/table3.csv")
    ap.add_argument("--table5", type=Path, help="results/table5.csv: its ε-sweep rows join the utility curves")
    ap.add_argument("--synth", type=Path,
                    help="results/synth (runs <model>/<variant>/eps<ε>/{generated,exec,roundtrip})")
    ap.add_argument("--out", required=True, type=Path, help="output directory for the PNGs")
    a = ap.parse_args(argv)
    if not (a.table3 or a.synth):
        raise PrivcodeError("give --table3 and/or --synth")
    if a.table5 and not a.table3:
        raise PrivcodeError("--table5 adds points to --table3's figure: give --table3 too")
    made = []
    if a.table3:
        made.append(privacy_utility(a.table3, a.out / "privacy_utility.png", table5_csv=a.table5))
    if a.synth:
        runs = find_synth_runs(a.synth)
        if not runs:
            raise PrivcodeError("no synthesis runs (<model>/<variant>/eps<ε>/<stage>/stats.json)", path=a.synth)
        made.append(funnel(runs, a.out / "funnel.png"))
    for p in made:
        print(p)
