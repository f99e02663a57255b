"""The training report: one static HTML page per batch run, written beside its run_summary.json.

Why a page: the log's metric tables answer "does the model beat its baselines, and where?" only
to someone who reads them line by line; a few pictures answer it at a glance and the page can be
attached to a review. Why one self-contained file: the images are PNG embedded as base64 and the
styles are inline, so the page opens from any copy of the version folder, offline, with no
sibling file to lose and nothing fetched.

Inputs are what the run already holds: ``run_summary.json`` (holdout metrics, the CV ranking,
data statistics, the gate's decision) and the driver's arrays (purchase counts per customer as
CSR, the final top-k lists, distinct buyers per product). The arrays are reduced to bin counts
and per-product totals before anything is drawn, so the report adds memory in proportion to the
catalogue, never to the purchase rows. Drawing uses matplotlib's Agg canvas directly (no pyplot
and no global backend switch), so it runs on a headless driver and cannot disturb other code.

A report that fails to render is logged and skipped: the model and the lists are already
written, and a missing picture must not fail a nightly run.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# Metrics on a 0..1 scale share one grouped chart; any other (novelty, in bits) gets its own panel.
UNIT_METRICS = ("precision", "recall", "map", "ndcg", "coverage", "diversity")
METRIC_ORDER = ("users", *UNIT_METRICS[:4], "coverage", "novelty", "diversity")
AT_K = {"precision", "recall", "map", "ndcg"}
NOT_METRICS = {"k", "users"}
BASELINES = (("popularity", "popularity"), ("item_knn", "item-kNN"))
PENALTY = re.compile(r",?penalty=([0-9.eE+-]+)")  # candidates.Candidate.name of a penalised scorer
COLORS = ("#1f5fa8", "#e08a1e", "#4a9a4a", "#8c5fb0", "#b04a4a", "#6b6b6b")
DECILES = 10
_ROW_CHUNK = 65_536          # list rows counted at a time, so the count needs no full-size temporary


# ------------------------------------------------------------------------------------- reductions

@dataclass(frozen=True)
class Histogram:
    """Bin counts over log-spaced edges: what a histogram needs, whatever the number of entities."""

    edges: np.ndarray
    counts: np.ndarray
    entities: int
    median: float
    p90: float
    maximum: float


@dataclass(frozen=True)
class ListExposure:
    """How the final lists spread over the catalogue, in catalogue-sized arrays and a few numbers.

    ``rec_share``/``purchase_share``/``product_share``: per popularity decile of products (decile 1
    = the products with most buyers), the share of list slots, of purchases and of products.
    ``lorenz_x``/``lorenz_y``: the concentration curve of list slots over products (least
    recommended first), thinned to at most a few hundred points.
    """

    n_items: int
    coverage: float
    slots: int
    rec_share: np.ndarray
    purchase_share: np.ndarray
    product_share: np.ndarray
    gini: float
    lorenz_x: np.ndarray
    lorenz_y: np.ndarray
    top_decile_rec_share: float
    top_decile_purchase_share: float


def per_customer_totals(indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Purchases per customer (the CSR row sums), by a prefix sum: one array the size of the
    counts, instead of a per-row Python loop."""
    prefix = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    indptr = np.asarray(indptr, dtype=np.int64)
    return prefix[indptr[1:]] - prefix[indptr[:-1]]


def per_product_totals(indices: np.ndarray, counts: np.ndarray, n_items: int) -> np.ndarray:
    """Purchases per product, summed from the customer-product counts (catalogue-sized)."""
    return np.bincount(np.asarray(indices, dtype=np.int64), weights=np.asarray(counts, dtype=np.float64),
                       minlength=n_items)


def log_histogram(values: np.ndarray, bins: int = 40) -> Histogram:
    """Counts over log-spaced bins: purchase counts are long-tailed, so linear bins would put
    nearly everyone in the first bar. Non-positive values (none in a real run) are left out."""
    values = np.asarray(values, dtype=np.float64)
    positive = values[values > 0]
    if positive.size == 0:
        return Histogram(np.array([1.0, 10.0]), np.zeros(1, dtype=np.int64), 0, float("nan"), float("nan"),
                         float("nan"))
    low, high = float(positive.min()), float(positive.max())
    n_bins = min(bins, max(5, int(np.sqrt(positive.size))))
    if high <= low * 1.0001:
        edges = np.array([low / 1.5, high * 1.5])
    elif np.all(positive == np.round(positive)):    # whole counts: bins end at half-integers, so
        edges = np.unique(np.round(np.geomspace(low, high + 1, n_bins + 1))) - 0.5     # 1, 2, 3 leave no gaps
    else:
        edges = np.geomspace(low, high * 1.0001, n_bins + 1)
    counts, _ = np.histogram(positive, bins=edges)
    median, p90 = np.percentile(positive, [50, 90])
    return Histogram(edges, counts, int(positive.size), float(median), float(p90), high)


def recommendation_counts(recommended: np.ndarray, n_items: int) -> np.ndarray:
    """How many lists hold each product (padding ``-1`` skipped), counted in row chunks so no
    mask as large as the lists is made."""
    counts = np.zeros(n_items, dtype=np.int64)
    for start in range(0, recommended.shape[0], _ROW_CHUNK):
        block = np.asarray(recommended[start:start + _ROW_CHUNK]).ravel()
        counts += np.bincount(block[block >= 0], minlength=n_items)[:n_items]
    return counts


def popularity_deciles(buyers: np.ndarray) -> np.ndarray:
    """Each product's decile (0 = the most bought 10%) by distinct buyers, ties by product index:
    the popularity scorer's own order."""
    n_items = buyers.size
    order = np.lexsort((np.arange(n_items), -np.asarray(buyers, dtype=np.float64)))
    decile = np.empty(n_items, dtype=np.int64)
    decile[order] = np.arange(n_items) * DECILES // max(n_items, 1)
    return decile


def list_exposure(recommended: np.ndarray, buyers: np.ndarray, product_purchases: np.ndarray) -> ListExposure:
    """Coverage and popularity bias of the final lists: does the model only echo the best sellers?

    Popularity bias is read against the purchases themselves: a model that gives the top decile a
    larger share of list slots than that decile has of purchases amplifies popularity."""
    n_items = int(buyers.size)
    per_item = recommendation_counts(recommended, n_items)
    slots = int(per_item.sum())
    decile = popularity_deciles(buyers)
    rec = np.bincount(decile, weights=per_item, minlength=DECILES)
    bought = np.bincount(decile, weights=product_purchases, minlength=DECILES)
    products = np.bincount(decile, minlength=DECILES).astype(np.float64)
    rec_share, purchase_share = _shares(rec), _shares(bought)
    lorenz_x, lorenz_y, gini = _lorenz(per_item)
    return ListExposure(n_items=n_items, coverage=float(np.count_nonzero(per_item) / max(n_items, 1)), slots=slots,
                        rec_share=rec_share, purchase_share=purchase_share, product_share=_shares(products),
                        gini=gini, lorenz_x=lorenz_x, lorenz_y=lorenz_y,
                        top_decile_rec_share=float(rec_share[0]), top_decile_purchase_share=float(purchase_share[0]))


def _shares(values: np.ndarray) -> np.ndarray:
    total = float(values.sum())
    return values / total if total > 0 else np.zeros_like(values, dtype=np.float64)


def _lorenz(per_item: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray, float]:
    """The concentration curve of list slots over products, and its Gini coefficient (0: every
    product equally often, 1: every slot on one product)."""
    n = per_item.size
    sorted_counts = np.sort(per_item).astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(sorted_counts)])
    total = cumulative[-1]
    if n == 0 or total <= 0:
        return np.array([0.0, 1.0]), np.array([0.0, 0.0]), float("nan")
    y = cumulative / total
    x = np.arange(n + 1) / n
    gini = float(1.0 - (y[:-1] + y[1:]).sum() / n)      # 1 - 2 * (trapezoid area under the curve)
    keep = np.unique(np.linspace(0, n, min(points, n + 1)).round().astype(np.int64))
    return x[keep], y[keep], gini


# ------------------------------------------------------------------------------------------ figures

def _png(figure) -> str:
    """The figure as a base64 PNG (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def metrics_chart(rows: Sequence[tuple[str, Mapping[str, Any]]], metrics: Sequence[str], k: int) -> str:
    """A grouped bar chart, one group per metric and one bar per recommender. Metrics on a 0..1
    scale share the first panel; each other metric (novelty, in bits) gets its own axis, so no
    bar is flattened by a larger scale."""
    unit = [m for m in metrics if m in UNIT_METRICS]
    others = [m for m in metrics if m not in UNIT_METRICS]
    figure = _figure(9.5, 3.6)
    grid = figure.add_gridspec(1, (len(unit) or 0) + 2 * len(others))
    panels = ([(figure.add_subplot(grid[0, :len(unit)]), unit)] if unit else []) + \
             [(figure.add_subplot(grid[0, len(unit) + 2 * i:len(unit) + 2 * i + 2]), [m]) for i, m in enumerate(others)]
    width = 0.8 / max(len(rows), 1)
    for axis, names in panels:
        positions = np.arange(len(names))
        for i, (label, values) in enumerate(rows):
            heights = [_number(values.get(m)) for m in names]
            axis.bar(positions + (i - (len(rows) - 1) / 2) * width, heights, width, label=label,
                     color=COLORS[i % len(COLORS)])
        axis.set_xticks(positions, [_metric_label(m, k) for m in names])
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    panels[0][0].set_ylabel("holdout value")
    if len(panels) > 1:
        panels[1][0].set_ylabel("bits")
    handles, labels = panels[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(rows), fontsize="small", frameon=False)
    return _png(figure)


def cv_chart(labels: Sequence[str], means: Sequence[float], sds: Sequence[float], selected: int | None,
             metric_label: str, popularity_mean: float | None) -> str:
    """Each CV candidate's mean with its spread over the folds (error bar = one sd), best first, the
    selected one highlighted and popularity's mean as a reference line."""
    figure = _figure(9.5, 0.9 + 0.32 * len(labels))
    axis = figure.add_subplot()
    positions = np.arange(len(labels))[::-1]
    colors = [COLORS[1] if i == selected else COLORS[0] for i in range(len(labels))]
    axis.barh(positions, [_number(m) for m in means], xerr=[_number(s) for s in sds], color=colors,
              capsize=3, error_kw={"elinewidth": 1})
    axis.set_yticks(positions, labels, fontsize="small")
    if popularity_mean is not None and np.isfinite(popularity_mean):
        axis.axvline(popularity_mean, color="#444", linestyle="--", linewidth=1, label="popularity's mean")
        axis.legend(fontsize="small", loc="lower right")
    axis.set_xlabel(f"mean {metric_label} over the folds (bar: ± 1 sd)")
    axis.grid(axis="x", alpha=0.3)
    axis.set_axisbelow(True)
    return _png(figure)


def penalty_families(table: Mapping[str, Mapping[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """Each scorer with popularity-penalised variants (``als(penalty=0.25)``...): its rows' names by
    penalty, the unpenalised row first (penalty 0). Empty when the run tried no penalty."""
    families: dict[str, list[tuple[float, str]]] = {}
    for name in table:
        found = PENALTY.search(name)
        if found:
            base = PENALTY.sub("", name).replace("()", "")
            families.setdefault(base, []).append((float(found.group(1)), name))
    return {base: sorted([(0.0, base)] * (base in table) + rows) for base, rows in families.items()}


def tradeoff_chart(table: Mapping[str, Mapping[str, Any]], families: Mapping[str, Sequence[tuple[float, str]]],
                   metric: str, k: int | None) -> str:
    """Accuracy against catalogue coverage, one line per penalised scorer (points labelled with the
    penalty) and popularity as a reference: what each penalty costs and what it buys."""
    figure = _figure(9.5, 3.8)
    axis = figure.add_subplot()
    for i, (base, rows) in enumerate(families.items()):
        xs = [_number(table[name].get("coverage")) for _, name in rows]
        ys = [_number(table[name].get(metric)) for _, name in rows]
        axis.plot(xs, ys, marker="o", color=COLORS[i % len(COLORS)], label=base)
        for (penalty, _), x, y in zip(rows, xs, ys):
            axis.annotate(f"{penalty:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if "popularity" in table:
        axis.plot([_number(table["popularity"].get("coverage"))], [_number(table["popularity"].get(metric))],
                  marker="s", linestyle="none", color="#444", label="popularity")
    axis.set_xlabel("catalogue coverage (share of products in some list)")
    axis.set_ylabel(_metric_label(metric, k))
    axis.legend(fontsize="small", loc="best")
    axis.grid(alpha=0.3)
    axis.set_axisbelow(True)
    return _png(figure)


def histograms_chart(panels: Sequence[tuple[str, str, Histogram]]) -> str:
    """Side-by-side histograms on log-log axes (long tails stay readable at both ends)."""
    figure = _figure(9.5, 3.2)
    for i, (title, xlabel, hist) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), i + 1)
        axis.bar(hist.edges[:-1], hist.counts, width=np.diff(hist.edges), align="edge", color=COLORS[i],
                 edgecolor="white", linewidth=0.4)
        axis.set_xscale("log")
        axis.set_yscale("log")
        _plain_ticks(axis)
        axis.set_title(title, fontsize="medium")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("count (log)")
        if np.isfinite(hist.median):
            axis.axvline(hist.median, color="#333", linestyle="--", linewidth=1, label=f"median {_amount(hist.median)}")
            axis.legend(fontsize="small")
    return _png(figure)


def _plain_ticks(axis) -> None:
    """Log axes labelled 1, 10, 100, 1,000 rather than 10^0, 10^1: read by people, not plotters."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    for ax in (axis.xaxis, axis.yaxis):
        ax.set_major_formatter(plain)
        ax.set_minor_formatter(NullFormatter())


def exposure_chart(exposure: ListExposure) -> str:
    """Left: per popularity decile, the share of list slots beside the share of purchases (bias is
    the gap). Right: the concentration of list slots over products (the diagonal is equal exposure)."""
    figure = _figure(9.5, 3.4)
    bars, curve = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    positions = np.arange(1, DECILES + 1)
    bars.bar(positions - 0.2, exposure.rec_share, 0.4, label="share of list slots", color=COLORS[0])
    bars.bar(positions + 0.2, exposure.purchase_share, 0.4, label="share of purchases", color=COLORS[1])
    bars.set_xticks(positions)
    bars.set_xlabel("popularity decile of products (1 = most buyers)")
    bars.set_ylabel("share")
    bars.legend(fontsize="small")
    bars.grid(axis="y", alpha=0.3)
    bars.set_axisbelow(True)
    curve.plot(exposure.lorenz_x, exposure.lorenz_y, color=COLORS[0], label=f"list slots (Gini {exposure.gini:.2f})")
    curve.plot([0, 1], [0, 1], color="#888", linestyle=":", label="equal exposure")
    curve.set_xlabel("share of products, least recommended first")
    curve.set_ylabel("cumulative share of list slots")
    curve.legend(fontsize="small", loc="upper left")
    curve.grid(alpha=0.3)
    return _png(figure)


# ------------------------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1040px;margin:1.5em auto;padding:0 1em;
color:#222}h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em;margin-bottom:.3em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0 1em}
th,td{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f4f4f4}tr.selected td{font-weight:600;background:#fff6e6}img{max-width:100%;display:block;margin:.4em 0}
.note{color:#555;font-size:.9em}.ok{color:#2a7a2a}.refused{color:#b03030}
dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;font-size:.9em}dt{color:#555}dd{margin:0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _cell(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if metric == "users" or isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return _e(value)


def _amount(value: float) -> str:
    """A purchase amount for a reader: whole thousands with separators, small values to 3 digits."""
    if not np.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _metric_label(metric: str, k: int | None) -> str:
    return f"{metric}@{k}" if metric in AT_K and k is not None else metric


def _img(data: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: Sequence[str], rows: Iterable[tuple[Sequence[str], bool]]) -> str:
    """An HTML table from pre-formatted (escaped) cells; a row flagged True is highlighted."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(("<tr class=\"selected\">" if flagged else "<tr>") + "".join(f"<td>{c}</td>" for c in cells)
                   + "</tr>" for cells, flagged in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_metrics(tables: Iterable[Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The metrics the run evaluated, in the log's column order, then any other numeric one."""
    seen: list[str] = []
    for table in tables:
        for row in table.values():
            for name, value in row.items():
                if name not in NOT_METRICS and name not in seen and (value is None or isinstance(value, (int, float))):
                    seen.append(name)
    ordered = [m for m in METRIC_ORDER if m in seen]
    return ordered + [m for m in seen if m not in ordered]


def comparison_rows(table: Mapping[str, Mapping[str, Any]], selected: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The model, popularity, item-kNN and plain ALS (``plain_als`` when CV moved away from the
    configured ALS, else the ``als`` row, which then is the configured ALS), those present. A
    baseline that is the model itself is left out: its bars would only repeat the model's."""
    rows = [(f"model ({selected})", table["model"])] if "model" in table else []
    rows += [(label, table[key]) for key, label in BASELINES if key in table and key != selected]
    plain = "plain_als" if "plain_als" in table else "als"
    if plain in table and not (plain == "als" and selected == "als"):
        rows.append(("plain ALS", table[plain]))
    return rows


def _metrics_table(table: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], k: int | None) -> str:
    headers = ["recommender", *[_metric_label(m, k) for m in metrics]]
    names = {"model": "model", "plain_als": "plain ALS (configured parameters)", "item_knn": "item-kNN"}
    return _table(headers, (([_e(names.get(name, name))] + [_cell(row.get(m), m) for m in metrics], name == "model")
                            for name, row in table.items()))


def overview_section(summary: Mapping[str, Any]) -> str:
    """What was trained on what, and what the gate decided: the page's context."""
    stats, metrics = summary.get("stats") or {}, summary.get("metrics") or {}
    selection = metrics.get("selection") or {}
    published = summary.get("published")
    verdict = ('<span class="ok">published</span>' if published else '<span class="refused">not published</span>')
    dropped = ", ".join(f"{_e(r)} {int(n):,}" for r, n in (stats.get("dropped") or {}).items() if n) or "none"
    items = [("version", _e(summary.get("version"))), ("publish gate", f"{verdict}: {_e(summary.get('gate', ''))}"),
             ("model", f"{_e(summary.get('model_type'))} ({_e(selection.get('selected', '?'))}, "
                       f"chosen by {_e(selection.get('by', '?'))})"),
             ("holdout split", f"{_e(metrics.get('split', '?'))}, lists of k = {_e(metrics.get('k', '?'))}, purchased "
                               f"products {'excluded' if metrics.get('exclude_purchased_main', True) else 'included'}"),
             ("rows", f"{_cell(stats.get('raw_rows'))} raw, {_cell(stats.get('clean_rows'))} clean "
                      f"(dropped: {dropped})"),
             ("data", f"{_cell(stats.get('pairs'))} customer-product pairs, {_cell(stats.get('customers'))} customers, "
                      f"{_cell(stats.get('products'))} products")]
    seconds = summary.get("stage_seconds") or {}
    if seconds:
        items.append(("run time", f"{sum(seconds.values()):,.0f} s ("
                      + ", ".join(f"{_e(n)} {s:,.1f} s" for n, s in seconds.items()) + ")"))
    body = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in items)
    return f'<section id="overview"><h2>Overview</h2><dl>{body}</dl></section>'


def baselines_section(metrics: Mapping[str, Any]) -> str:
    """The model against popularity, item-kNN and plain ALS on every metric the run measured."""
    k = metrics.get("k")
    main = "exclude_purchased" if metrics.get("exclude_purchased_main", True) else "include_purchased"
    tables = {key: metrics[key] for key in ("exclude_purchased", "include_purchased") if metrics.get(key)}
    parts = ['<section id="baselines"><h2>The model against its baselines (holdout)</h2>']
    if main in tables:
        selected = str(metrics.get("selected") or (metrics.get("selection") or {}).get("selected", "model"))
        rows = comparison_rows(tables[main], selected)
        names = table_metrics([tables[main]])
        chart_metrics = [m for m in names if m != "users"]
        missing = [label for key, label in (*BASELINES, ("als", "plain ALS")) if key not in tables[main]
                   and not (key == "als" and "plain_als" in tables[main])]
        parts.append(_img(metrics_chart(rows, chart_metrics, k), "the model against its baselines on every metric"))
        parts.append(f'<p class="note">Purchased products {"excluded" if main == "exclude_purchased" else "included"}; '
                     "precision, recall, MAP and nDCG over the customers with held-out purchases, coverage, "
                     "novelty (bits) and diversity over all their lists."
                     + (f" Not evaluated in this run: {_e(', '.join(missing))}." if missing else "") + "</p>")
        families = penalty_families(tables[main])
        if families and "coverage" in names and "ndcg" in names:
            parts.append("<h3>Popularity penalty: accuracy against coverage</h3>")
            parts.append(_img(tradeoff_chart(tables[main], families, "ndcg", k),
                              "nDCG against catalogue coverage for each popularity penalty"))
            parts.append('<p class="note">Each point is a scorer at one popularity penalty (the label; '
                         "batch.scorers.popularity_penalties), scored on the same holdout: higher penalties "
                         "reach more of the catalogue at some cost in accuracy.</p>")
    else:
        parts.append('<p class="note">This run measured no ranking metric on the holdout.</p>')
    for key, table in tables.items():
        parts.append(f"<h3>Purchased products {'excluded' if key == 'exclude_purchased' else 'included'}</h3>")
        parts.append(_metrics_table(table, table_metrics([table]), k))
    if metrics.get("buy_again"):
        parts.append("<h3>Buy-again lists on the held-out repurchases</h3>")
        parts.append(_metrics_table(metrics["buy_again"], table_metrics([metrics["buy_again"]]), k))
    if metrics.get("rmse"):
        parts.append("<h3>RMSE (explicit ratings)</h3>" + _table(["part", "rmse"], (
            ([_e(part), _cell(value)], False) for part, value in metrics["rmse"].items())))
    parts.append("</section>")
    return "".join(parts)


def cv_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A candidate's name plus only the ALS parameters that vary across the CV rows (the rest is
    the same for every candidate and would only make the labels unreadable)."""
    params = [row.get("params") or {} for row in rows]
    keys = sorted({key for p in params for key in p})
    varying = [key for key in keys if len({json.dumps(p.get(key)) for p in params if p}) > 1]
    labels = []
    for row, p in zip(rows, params):
        if not p:
            labels.append(f"{row.get('model')} (no ALS)")
            continue
        detail = ", ".join(f"{key}={p[key]:g}" if isinstance(p.get(key), float) else f"{key}={p.get(key)}"
                           for key in varying)
        labels.append(f"{row.get('model')} ({detail})" if detail else str(row.get("model")))
    return labels


def cv_section(metrics: Mapping[str, Any]) -> str:
    """The CV candidates with their spread over the folds, or a note that there was no CV."""
    rows = list(metrics.get("cross_validation") or [])
    selection = metrics.get("selection") or {}
    metric = str(selection.get("metric", "map"))
    label = _metric_label(metric, metrics.get("k"))
    parts = ['<section id="cross-validation"><h2>Cross-validation candidates</h2>']
    if not rows:
        parts.append(f'<p class="note">Cross-validation was off for this run: the model was chosen by '
                     f'{_e(selection.get("by", "configuration"))}. With <code>batch.cv_folds</code> &ge; 2 and more '
                     "than one candidate (no <code>--no-cv</code>), every candidate's mean and spread over the folds "
                     "appears here.</p></section>")
        return "".join(parts)
    means = [row.get(f"mean_{metric}") for row in rows]
    sds = [row.get(f"sd_{metric}") for row in rows]
    chosen = next((i for i, row in enumerate(rows) if row.get("model") == selection.get("selected")
                   and (row.get("params") is None or row.get("params") == selection.get("params"))), None)
    popularity = next((_number(m) for row, m in zip(rows, means) if row.get("model") == "popularity"), None)
    labels = cv_labels(rows)
    parts.append(_img(cv_chart(labels, means, sds, chosen, label, popularity),
                      "cross-validation candidates, mean and spread"))
    parts.append(f'<p class="note">{_e(selection.get("by", ""))} on the training part, best first; the selected '
                 "candidate is highlighted. The spread is the standard deviation over the folds.</p>")
    parts.append(_table(["candidate", f"mean {label}", "sd", "mean ± sd"],
                        (([_e(name), _cell(_number(m)), _cell(_number(s)),
                           f"{_number(m):.4f} ± {_number(s):.4f}"], i == chosen)
                         for i, (name, m, s) in enumerate(zip(labels, means, sds)))))
    parts.append("</section>")
    return "".join(parts)


def purchases_section(per_customer: Histogram, per_product: Histogram, weighted: bool) -> str:
    """How purchases spread over customers and products: the data the model learns from."""
    unit = "purchases (recency-weighted)" if weighted else "purchases"
    chart = histograms_chart([("per customer", f"{unit} per customer (log)", per_customer),
                              ("per product", f"{unit} per product (log)", per_product)])
    rows = [([name, _cell(h.entities), _amount(h.median), _amount(h.p90), _amount(h.maximum)], False)
            for name, h in (("customers", per_customer), ("products", per_product))]
    return ('<section id="purchases"><h2>Purchases per customer and per product</h2>'
            + _img(chart, "distribution of purchases per customer and per product")
            + f'<p class="note">All the data the final model was trained on; {_e(unit)} counted as the job counts them '
              "(<code>data.count_mode</code>). Both axes are logarithmic.</p>"
            + _table(["", "count", "median", "90th percentile", "max"], rows) + "</section>")


def lists_section(exposure: ListExposure, k: int | None) -> str:
    """Coverage and popularity bias of the lists every customer receives from this run."""
    chart = exposure_chart(exposure)
    facts = [("catalogue coverage",
              f"{exposure.coverage:.1%} of {exposure.n_items:,} products appear in at least one list"),
             ("list slots", f"{exposure.slots:,}" + (f" (top-{k} per customer)" if k else "")),
             ("most popular 10% of products", f"{exposure.top_decile_rec_share:.1%} of list slots against "
                                               f"{exposure.top_decile_purchase_share:.1%} of purchases"),
             ("concentration (Gini of list slots per product)", _cell(exposure.gini))]
    body = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in facts)
    decile_rows = ((["decile " + str(d + 1), f"{exposure.product_share[d]:.1%}", f"{exposure.purchase_share[d]:.1%}",
                     f"{exposure.rec_share[d]:.1%}"], False) for d in range(DECILES))
    return ('<section id="lists"><h2>Coverage and popularity bias of the lists</h2>'
            + _img(chart, "share of list slots per popularity decile and their concentration")
            + f"<dl>{body}</dl>"
            + '<p class="note">The final lists written by this run (recommendations.parquet), against the purchases. '
              "Deciles rank products by distinct buyers, as the popularity model does: a larger share of slots than "
              "of purchases in decile 1 means the lists favour best sellers beyond what customers buy.</p>"
            + _table(["popularity decile", "products", "purchases", "list slots"], decile_rows) + "</section>")


def render(summary: Mapping[str, Any], per_customer: Histogram, per_product: Histogram,
           exposure: ListExposure) -> str:
    """The whole page from the run summary and the reduced arrays (no file access: testable alone)."""
    metrics = summary.get("metrics") or {}
    weighted = "recency_half_life_days" in (summary.get("params") or {})
    title = f"Training report {summary.get('version', '')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            + overview_section(summary) + baselines_section(metrics) + cv_section(metrics)
            + purchases_section(per_customer, per_product, weighted) + lists_section(exposure, metrics.get("k"))
            + "</body></html>\n")


def build_report(summary: Mapping[str, Any], indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                 recommended: np.ndarray, buyers: np.ndarray) -> str:
    """Reduce the run's arrays to histograms and per-decile shares, then render the page."""
    buyers = np.asarray(buyers)
    per_product = per_product_totals(indices, counts, buyers.size)
    return render(summary, log_histogram(per_customer_totals(indptr, counts)), log_histogram(per_product),
                  list_exposure(np.asarray(recommended), buyers, per_product))


def write_report(run_dir: Path, indptr: np.ndarray, indices: np.ndarray, counts: np.ndarray,
                 recommended: np.ndarray, buyers: np.ndarray) -> Path | None:
    """Write ``report.html`` beside the run's ``run_summary.json`` (read back from there, so the
    page shows exactly what the summary records); the path, or None when it could not be made.

    ``indptr``/``indices``/``counts``: every customer's purchase counts (CSR by customer index);
    ``recommended``: the final ``[customers, k]`` lists as product indices (-1 pads);
    ``buyers``: distinct buyers per product index.
    """
    path = Path(run_dir) / REPORT_NAME
    try:
        summary = json.loads((Path(run_dir) / "run_summary.json").read_text())
        page = build_report(summary, indptr, indices, counts, recommended, buyers)
        partial = path.with_name(f".{REPORT_NAME}.tmp")
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, path)
    except Exception:       # noqa: BLE001 - the model is written; a report must not fail the run
        log.warning("training report not written", exc_info=True)
        return None
    return path
