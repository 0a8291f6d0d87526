"""Bar chart of the latest speed ratios against scvi-tools, and a markdown table for the README.

Reads ``benchmarks/results/train.csv`` and ``embed.csv``, keeps the newest run (same date stamp)
of each suite and device, and writes ``benchmarks/results/ratios.png``; ``--markdown`` prints the
table that the README shows.
"""

from __future__ import annotations

import argparse

import pandas as pd

import _common as C


def _wide(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the long schema (``_common.result_row``) as one row per case: cells/s and the
    ratio to scvi-tools side by side, the source taken from ``mode`` (``"store,npy,fp32"``)."""
    keys = ["date", "device", "provider", "impl", "mode", "shape"]
    rate = df[df["metric"] == "cells_per_s"][keys + ["median"]]
    ratio = df[df["metric"] == "ratio_vs_scvi_tools"][keys + ["median"]]
    out = rate.merge(ratio, on=keys, how="left", suffixes=("", "_ratio"))
    return out.assign(
        framework=out["provider"].str.replace("-", "_"),
        source=out["mode"].str.split(",").str[0] + " " + out["mode"].str.split(",", n=1).str[1],
        cells_per_s_median=out["median"], ratio_vs_scvi_tools=out["median_ratio"],
    )


def latest(name: str) -> pd.DataFrame:
    path = C.RESULTS / name
    if not path.exists():
        return pd.DataFrame()
    df = pd.read_csv(path)
    if "metric" in df.columns:
        df = _wide(df)
    keys = ["suite", "device"] if "suite" in df.columns else ["device"]
    newest = df.groupby(keys)["date"].transform("max")
    df = df[df["date"] == newest].copy()
    df["what"] = name.split(".")[0]
    return df


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default=str(C.RESULTS / "ratios.png"))
    a = p.parse_args(argv)
    train, embed = latest("train.csv"), latest("embed.csv")
    if "suite" not in embed.columns and len(embed):
        embed["suite"] = "census"
    df = pd.concat([train, embed], ignore_index=True)
    if df.empty:
        raise SystemExit("no benchmark rows yet: run bench_train.py / bench_embed.py first")
    df["label"] = df["what"] + "/" + df["suite"] + ": " + df["framework"] + " " + df["impl"] + \
        " (" + df["source"] + ")"
    if a.markdown:
        cols = ["what", "suite", "device", "framework", "impl", "source", "cells_per_s_median",
                "ratio_vs_scvi_tools", "elbo_validation", "date"]
        cols = [c for c in cols if c in df.columns]
        print(df[cols].to_markdown(index=False, floatfmt=".4g"))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[(df["framework"] == "scvi_fast") & df["ratio_vs_scvi_tools"].notna()]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(sub) + 1.5))
    ax.barh(sub["label"] + " | " + sub["device"].str.slice(0, 28), sub["ratio_vs_scvi_tools"],
            color="tab:blue")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speed-up over scvi-tools (cells/s ratio, same run)")
    for y, v in enumerate(sub["ratio_vs_scvi_tools"]):
        ax.text(v, y, f" {v:.1f}x", va="center")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
