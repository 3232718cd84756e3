"""PNG charts: per-layer sparsity, a sweep's perplexity against sparsity, layer sensitivity.

matplotlib draws off-screen (the Agg backend); every figure is WIDTH x HEIGHT pixels exactly
(no tight bounding box), so a chart's size does not depend on its labels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LlmpruneError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

WIDTH, HEIGHT, DPI = 960, 540, 120  # pixels, pixels, dots per inch
NEEDS_MATPLOTLIB = "PNG plots need matplotlib: pip install matplotlib"


def figure(rows: int = 1) -> Figure:
    """A new off-screen figure of WIDTH x HEIGHT pixels with ``rows`` stacked axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LlmpruneError(NEEDS_MATPLOTLIB) from None
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    fig.subplots(rows, 1, squeeze=False)
    return fig


def integer_ticks(ax) -> None:
    """Decoder layers are whole numbers."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as err:
        raise LlmpruneError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def sparsity_bars(layers: list[float], target: float, path: Path, title: str) -> Path:
    """One bar per decoder layer (achieved sparsity), the parameter-weighted target as a line."""
    fig = figure()
    ax = fig.axes[0]
    ax.bar(range(len(layers)), [100 * s for s in layers], color="tab:blue", label="achieved")
    ax.axhline(100 * target, color="tab:red", linestyle="--", label=f"target mean {target:.1%}")
    ax.set(xlabel="decoder layer", ylabel="sparsity (%)", title=title, ylim=(0, 100))
    ax.legend(loc="best")
    integer_ticks(ax)
    return save(fig, path)


def sweep_lines(points: list[dict], dense: float, path: Path, title: str) -> Path:
    """Perplexity against sparsity, one line per method; the dense perplexity as a reference line."""
    fig = figure()
    ax = fig.axes[0]
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["sparsity"])
        ax.plot([100 * p["sparsity"] for p in mine], [p["perplexity"] for p in mine], marker="o", label=method)
    ax.axhline(dense, color="black", linestyle="--", label=f"dense {dense:.2f}")
    ax.set(xlabel="sparsity (%)", ylabel="perplexity (log scale)", yscale="log", title=title)
    ax.legend()
    return save(fig, path)


def sensitivity_lines(damage: list[dict[float, float]], allocation: list[float], metric: str, path: Path,
                      title: str) -> Path:
    """Top: each layer's damage, one line per probed sparsity. Bottom: the sparsity allocated to each layer."""
    fig = figure(rows=2)
    top, bottom = fig.axes
    layers = range(len(damage))
    for ratio in sorted(damage[0]):
        top.plot(layers, [d[ratio] for d in damage], marker=".", label=f"{ratio:.0%}")
    top.set(ylabel=metric, yscale="log", title=title)
    top.legend(title="layer sparsity", fontsize="small")
    bottom.bar(layers, [100 * s for s in allocation], color="tab:green")
    bottom.set(xlabel="decoder layer", ylabel="allocated (%)", ylim=(0, 100))
    integer_ticks(top)
    integer_ticks(bottom)
    return save(fig, path)


SPARSITY_CHART = "sparsity.png"


def sparsity_chart(recipe: dict, folder: Path) -> dict[str, str]:
    """The per-layer sparsity bar chart beside the model; without matplotlib, a warning and no chart."""
    sp = recipe["sparsity"]
    kind = "owl" if "owl" in recipe else recipe["config"].get("schedule") or recipe["config"].get("ratios") or "uniform"
    try:
        sparsity_bars(sp["layers"], sp["target_mean"], folder / SPARSITY_CHART,
                            f"{recipe['config']['method']}, {recipe['config']['pattern']}, {kind}: "
                            f"{sp['overall']:.1%} overall")
    except LlmpruneError as err:
        if str(err) != NEEDS_MATPLOTLIB:
            raise
        log.warning("no sparsity chart: %s", err)
        return {}
    return {"sparsity": SPARSITY_CHART}
