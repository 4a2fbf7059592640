"""The analysis's results as text, JSON, PNG plots and an HTML page.

* :func:`format_table` / :func:`format_agreement`: plain-text tables for the terminal.
* :func:`report_files`: the report's files as bytes, ``report.json``, ``report.html`` and the plots
  (``cosine.png``, ``snr.png``, ``saturation.png``, ``worst_<k>.png``: float vs quantized values of the
  worst layers). A non-finite number (an SNR of identical values is +inf) is written to the JSON as the
  string ``"inf"``, ``"-inf"`` or ``"nan"`` so the file stays strict JSON.
* The HTML page is the Jinja2 template ``templates/report.html.j2`` shipped with the package (autoescaped);
  it stands alone: the plots are embedded as ``data:`` URIs (the PNG files are written beside it too).
* The plots need matplotlib (``pip install matplotlib``), imported only here, drawing on the Agg canvas
  without pyplot's global state.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

from amct_caffe.analysis.metrics import Metrics
from amct_caffe.analysis.results import (
    MODEL_LABELS,
    PAIR_LABELS,
    RANDOM_NOTE,
    SKIP_HINT,
    BlobAgreement,
    LayerReport,
    ReportResult,
)
from amct_caffe.errors import ConfigError

#: Layers shown in the float-vs-quantized plots (the lowest cosines).
WORST_LAYERS = 3
#: The footnote of the report table about the LSB column.
LSB_NOTE = ("LSB: fake-quant vs deploy in steps of the next Quant reading the layer (through in-place "
            "layers and ReLUs); for a layer no Quant reads, in steps of its INT32 accumulator (deq_scale), "
            "where one flipped input code shows as many steps.")
#: What the page says about the LSB column (the same facts, for a reader who has not seen the terminal).
LSB_EXPLANATION = (
    "The LSB column is the largest difference between the fake-quant and the deploy model at the layer's "
    "output, counted in quantization steps (least significant bits) of that output: the step (scale_d) of "
    "the next Quant layer that reads it, through in-place layers and ReLUs. Fake-quant and deploy compute "
    "the same integer arithmetic in different orders, so a value of about 1 or less is a rounding tie; more "
    "means the two models disagree. A layer that no Quant reads (the net's last layers) is counted in steps "
    "of its INT32 accumulator (deq_scale), far finer than an INT8 step, so one flipped input code shows as "
    "many steps there."
)

Figure = Callable[..., Any]


# ---------------------------------------------------------------------------------------------------------
# text tables
# ---------------------------------------------------------------------------------------------------------
def _number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; None as '-', infinities as 'inf' / '-inf'."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _fmt(value: float | None, spec: str, width: int) -> str:
    if value is None or math.isinf(value):
        return f"{_number(value, spec):>{width}}"
    return f"{value:{width}{spec}}"


def format_table(result: ReportResult) -> str:
    """A plain-text table of the report for the terminal: one line per quantized layer (``*``: a skip
    candidate; ``sat%``: the fake-quant model's saturation), then the net outputs and the skip candidates."""
    pairs = result.pairs
    lsb = "fake_vs_deploy" in pairs
    name_w = max([10] + [len(r.layer) + 1 for r in result.layers] + [len(o.blob) + 1 for o in result.outputs])
    lead = f"{'':<{name_w}} {'':<12} {'':>7}"
    group = "".join(f" {PAIR_LABELS[k]:^28}" for k in pairs)
    head = f"{'layer':<{name_w}} {'type':<12} {'sat%':>7}"
    head += "".join(f" {'cosine':>9} {'SNR dB':>8} {'max abs':>9}" for _ in pairs)
    head += f" {'LSB':>7}" if lsb else ""
    lines = [lead + group, head]

    def cells(metrics: Mapping[str, Metrics | None]) -> str:
        out = ""
        for key in pairs:
            m = metrics.get(key)
            out += (f" {_fmt(m.cosine if m else None, '.6f', 9)} {_fmt(m.snr_db if m else None, '.2f', 8)}"
                    f" {_fmt(m.max_abs if m else None, '.3g', 9)}")
        if lsb:
            m = metrics.get("fake_vs_deploy")
            out += f" {_fmt(m.max_lsb if m else None, '.3f', 7)}"
        return out

    for r in result.layers:
        sat = r.saturation.get("fake")
        mark = "*" if r.layer in result.skip_candidates else " "
        lines.append(f"{mark}{r.layer:<{name_w - 1}} {r.layer_type[:12]:<12} "
                     f"{_fmt(sat.rate * 100 if sat else None, '.3f', 7)}{cells(r.metrics)}")
    if result.outputs:
        lines.append("net outputs:")
        for o in result.outputs:
            lines.append(f" {o.blob:<{name_w - 1}} {'':<12} {'':>7}{cells(o.metrics)}")
    if result.accuracy:
        lines.append("accuracy (mean over the batches): " + "; ".join(
            f"{blob}: " + ", ".join(f"{MODEL_LABELS.get(w, w)} {v:.4f}" for w, v in values.items())
            for blob, values in result.accuracy.items()))
    if lsb:
        lines.append(LSB_NOTE)
    if result.inputs == "random":
        lines.append(f"note: {RANDOM_NOTE}.")
    if result.skip_candidates:
        lines.append(f"candidates to skip (cosine < {result.threshold:g}): "
                     f"{', '.join(result.skip_candidates)}")
        lines.append(f"  hint: {SKIP_HINT}.")
    elif not result.measured:
        lines.append("nothing was measured: the models share no quantized layer and no output blob.")
    else:
        lines.append(f"no layer below the cosine threshold {result.threshold:g}.")
    return "\n".join(lines)


def format_agreement(rows: Sequence[BlobAgreement]) -> str:
    """A plain-text table of :func:`amct_caffe.analysis.compare.compare_models` rows (one line per blob)."""
    lines = [f"{'blob':<32} {'kind':<11} {'max_abs':>11} {'max_lsb':>9} {'cosine':>10} {'rel_err':>10} "
             f"{'flips':>6}"]
    for r in rows:
        lsb = f"{r.max_lsb:9.3f}" if r.max_lsb is not None else f"{'-':>9}"
        flips = f"{r.flips:6d}" if r.flips is not None else f"{'-':>6}"
        mark = " (output)" if r.is_output else ""
        lines.append(f"{r.blob:<32} {r.kind:<11} {r.max_abs_diff:11.4g} {lsb} {r.cosine:10.7f} "
                     f"{r.rel_err:10.3g} {flips}{mark}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# PNG plots
# ---------------------------------------------------------------------------------------------------------
def plot_figure_factory() -> Figure:
    """A factory of matplotlib Figures on the Agg canvas (no pyplot).

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError as exc:
        raise ConfigError(
            "The compare report's plots need matplotlib, which is not installed: pip install matplotlib "
            "(or pass out_dir=None and print format_table(result))."
        ) from exc

    def agg_figure(**kwargs: Any) -> Any:
        fig = MplFigure(**kwargs)
        FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
        return fig

    return agg_figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _bar_chart(figure: Figure, names: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str,
               ylabel: str, hline: float | None = None, cap_inf: bool = False) -> bytes:
    fig = figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    finite = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    cap = (max(finite) + 10.0 if finite else 100.0) if cap_inf else None
    for k, (label, vals) in enumerate(series.items()):
        ys = []
        for v in vals:
            if v is None or math.isnan(v):
                ys.append(np.nan)
            elif math.isinf(v) and cap is not None:
                ys.append(cap if v > 0 else 0.0)
            else:
                ys.append(v)
        ax.bar(x + (k - (len(series) - 1) / 2) * width, ys, width, label=label)
    if hline is not None:
        ax.axhline(hline, color="red", linestyle="--", linewidth=1, label=f"threshold {hline:g}")
    if finite and hline is not None:
        low = min(finite + [hline])
        ax.set_ylim(max(-1.0, low - 0.1 * (1.0 - low) - 1e-6), 1.0 + 0.02 * (1.0 - low) + 1e-7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _worst_chart(figure: Figure, r: LayerReport) -> bytes:
    fig = figure(figsize=(10.0, 4.2))
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    ref = r.samples.get("float")
    if ref is not None and ref.size:
        for which in ("fake", "deploy"):
            v = r.samples.get(which)
            if v is None:
                continue
            ax1.scatter(ref, v, s=3, alpha=0.4, label=MODEL_LABELS[which])
            ax2.hist(v - ref, bins=60, alpha=0.5, label=MODEL_LABELS[which])
        lo, hi = float(ref.min()), float(ref.max())
        ax1.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    cos = r.worst_cosine()
    title = f"{r.layer} ({r.blob}): float vs quantized"
    ax1.set_title(title + (f", cosine {cos:.6f}" if cos is not None else ""), fontsize=9)
    ax1.set_xlabel("float")
    ax1.set_ylabel("quantized")
    ax1.legend(fontsize=8)
    ax2.set_title(f"{r.layer}: error (quantized - float)", fontsize=9)
    ax2.set_xlabel("error")
    ax2.set_ylabel("count")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def render_plots(result: ReportResult) -> dict[str, bytes]:
    """The PNG plots of the report, ``{file name: PNG bytes}``.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    figure = plot_figure_factory()
    plots: dict[str, bytes] = {}
    names = [r.layer for r in result.layers]
    if not names:
        return plots
    float_pairs = [k for k in result.pairs if k != "fake_vs_deploy"]

    def series(attr: str, keys: Sequence[str]) -> dict[str, list[float | None]]:
        return {PAIR_LABELS[k]: [getattr(m, attr) if (m := r.metrics.get(k)) else None for r in result.layers]
                for k in keys}

    plots["cosine.png"] = _bar_chart(figure, names, series("cosine", float_pairs),
                                     "Cosine similarity to the float model per quantized layer", "cosine",
                                     hline=result.threshold)
    plots["snr.png"] = _bar_chart(figure, names, series("snr_db", float_pairs),
                                  "SNR to the float model per quantized layer", "SNR [dB]", cap_inf=True)
    sat_series = {MODEL_LABELS[w]: [r.saturation[w].rate * 100 if w in r.saturation else None
                                    for r in result.layers]
                  for w in ("fake", "deploy") if any(w in r.saturation for r in result.layers)}
    plots["saturation.png"] = _bar_chart(figure, names, sat_series,
                                         "Saturation of the activation quantizer (inputs clipped)",
                                         "clipped [%]")
    ranked = sorted(((cos, r) for r in result.layers
                     if (cos := r.worst_cosine()) is not None and r.samples.get("float") is not None),
                    key=lambda item: item[0])
    for k, (_, r) in enumerate(ranked[:WORST_LAYERS], start=1):
        plots[f"worst_{k}.png"] = _worst_chart(figure, r)
    return plots


# ---------------------------------------------------------------------------------------------------------
# HTML and JSON
# ---------------------------------------------------------------------------------------------------------
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("amct_caffe.analysis", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_TEMPLATES.filters["number"] = _number


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, so the page shows it without the file beside it."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(result: ReportResult, plots: Mapping[str, bytes]) -> str:
    """The HTML page of the report, standing alone: ``plots`` (``{file name: PNG bytes}``) are embedded as
    ``data:`` URIs."""
    template = _TEMPLATES.get_template("report.html.j2")
    embedded = [(name, data_uri(png)) for name, png in plots.items()]
    return template.render(result=result, plots=embedded, pair_labels=PAIR_LABELS,
                           model_labels=MODEL_LABELS, skip_hint=SKIP_HINT, random_note=RANDOM_NOTE,
                           with_lsb="fake_vs_deploy" in result.pairs, lsb_explanation=LSB_EXPLANATION)


def render_json(result: ReportResult, plots: Sequence[str]) -> str:
    """``report.json``: :meth:`ReportResult.to_dict` with the plot file names, as strict JSON."""
    data = result.to_dict()
    data["plots"] = sorted(plots)
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def report_files(result: ReportResult) -> dict[str, bytes]:
    """The report's files, ``{file name: contents}``: ``report.json``, ``report.html`` and the plots.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    plots = render_plots(result)
    return {
        "report.json": render_json(result, list(plots)).encode("utf-8"),
        "report.html": render_html(result, plots).encode("utf-8"),
        **plots,
    }
