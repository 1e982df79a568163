"""Every PNG genpi draws: the report's figures and the efficiency plot (matplotlib, Agg backend, no display).

A figure is a row of panels, each a title and a `draw(ax)`: `bars` and `lines` make the draws. The report
(genpi.eval.report) and genpi eval efficiency both draw through here, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path


def figure(path: Path, panels: list[tuple[str, callable]]) -> str:
    """Draw the panels side by side into `path`; returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (title, draw) in zip(axes[0], panels):
        draw(ax)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path.name


def bars(groups: list[str], series: dict[str, list[float | None]], ylabel: str):
    def draw(ax):
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            xs = [g + i * width for g in range(len(groups))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
        ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        _legend(ax)

    return draw


def _legend(ax) -> None:
    """Beside the axes, so it never covers a line or a bar."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def lines(
    series: dict[str, list[float]], xlabel: str, ylabel: str, x: dict[str, list] | None = None, marker: str = "o"
):
    def draw(ax):
        from matplotlib.ticker import MaxNLocator

        for name, values in series.items():
            ax.plot(x[name] if x else range(1, len(values) + 1), values, marker=marker, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if x is None:  # turns and steps are counts
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if series:
            _legend(ax)

    return draw


def efficiency_plot(result: dict, path: Path) -> str:
    """Cumulative MACs over turns, per-turn latency and KV bytes, per system and regime (the paper's figures' style),
    from one genpi eval efficiency result."""

    def series(key, cumulative=False):
        out = {}
        for name, s in result["systems"].items():
            for regime, r in s["regimes"].items():
                values = [t.get(key) if isinstance(key, str) else key(t) for t in r["turns"]]
                if None in values:
                    return {}
                out[f"{name} / {regime}"] = [sum(values[: k + 1]) for k in range(len(values))] if cumulative else values
        return out

    panels = [
        (
            f"cumulative GMACs: {result['prompt_id']}",
            lines({k: [v / 1e9 for v in vs] for k, vs in series("cumulative_macs").items()}, "turn", "GMACs"),
        ),
        (
            f"KV cache per conversation ({result['kv_dtype']})",
            lines({k: [v / 2**20 for v in vs] for k, vs in series("kv_bytes").items()}, "turn", "MiB"),
        ),
    ]
    latency = series(lambda t: None if t.get("prefill_s") is None else t["prefill_s"] + t["decode_s"])
    if latency:
        panels.insert(1, ("latency per turn (prefill + decode)", lines(latency, "turn", "seconds")))
    return figure(path, panels)
