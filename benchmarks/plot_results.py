"""Bar chart of the latest speed ratios against scvi-tools, and a markdown table for the README.

Reads the long-schema ``train.csv``, ``embed.csv`` and ``census_model.csv`` of the results
folder, keeps the newest row of every case (``what``, ``device``, ``provider``, ``impl``,
``mode``, the batch size of ``config``, ``metric``) and writes ``ratios.png``; ``--markdown`` prints the cells/s, ratio and
validation ELBO of those cases instead.
"""

from __future__ import annotations

import argparse

import pandas as pd

import _common as C

FILES = ("train.csv", "embed.csv", "census_model.csv")
CASE = ["what", "device", "provider", "impl", "mode", "batch_size"]


def latest(names=FILES) -> pd.DataFrame:
    """The newest row of every case and metric over the long-schema files ``names``."""
    frames = []
    for name in names:
        if not (C.RESULTS / name).exists():
            continue
        try:
            frames.append(C.read_results(name))
        except ValueError as err:
            print(f"left out: {err}")
    if not frames:
        return pd.DataFrame(columns=C.RESULT_FIELDS)
    df = pd.concat(frames, ignore_index=True)
    df["impl"] = df["impl"].fillna("")
    df["mode"] = df["mode"].fillna("")
    df["batch_size"] = [str(c.get("batch_size", "")) for c in df["config"]]
    df = df.sort_values("date").groupby(CASE + ["metric"], as_index=False, sort=False).last()
    return df.sort_values(CASE, ignore_index=True)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One line per case: cells/s, ratio and validation ELBO side by side."""
    keep = df[df["metric"].isin(["cells_per_s", "ratio_vs_scvi_tools", "elbo_validation"])]
    out = keep.pivot_table(index=CASE, columns="metric", values="median", aggfunc="first")
    dates = keep.groupby(CASE)["date"].max()
    return out.join(dates).reset_index()


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (numbers to 4 significant digits, blanks for missing)."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |",
             "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default=str(C.RESULTS / "ratios.png"))
    a = p.parse_args(argv)
    df = latest()
    if df.empty:
        raise SystemExit("no benchmark rows yet: run bench_train.py / bench_embed.py first")
    if a.markdown:
        print(markdown(wide(df)))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[(df["provider"] == "scvi_fast") & (df["metric"] == "ratio_vs_scvi_tools")]
    sub = sub.sort_values(["what", "device", "mode", "impl"], ignore_index=True)
    labels = (sub["what"] + ": " + sub["impl"] + " (" + sub["mode"] + ") | "
              + sub["device"].str.slice(0, 28))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(sub) + 1.5))
    ax.barh(labels, sub["median"], color="tab:blue")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speed-up over scvi-tools (cells/s ratio, same run)")
    for y, v in enumerate(sub["median"]):
        ax.text(v, y, f" {v:.1f}x", va="center")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
