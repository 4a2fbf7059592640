"""The analysis's text tables, JSON and HTML page (analysis.render) on results written by hand."""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import math
import re

from amct_caffe.analysis import render
from amct_caffe.analysis.metrics import Metrics, Saturation
from amct_caffe.analysis.results import BlobAgreement, LayerReport, OutputReport, ReportResult

PAIRS = ["float_vs_fake", "float_vs_deploy", "fake_vs_deploy"]


def metrics(cosine: float, snr_db: float, max_abs: float, max_lsb: float | None = None) -> Metrics:
    return Metrics(cosine=cosine, snr_db=snr_db, max_abs=max_abs, count=8, rel_err=0.01, max_lsb=max_lsb)


def hand_result(inputs: str = "given") -> ReportResult:
    conv = LayerReport(
        layer="conv<1>", layer_type="Convolution", blob="conv<1>", quant_layer="conv<1>_quant_layer",
        scale_d=0.0125, offset_d=-7, shape=(2, 4, 3, 3), is_output=False,
        metrics={"float_vs_fake": metrics(0.95, 12.5, 0.25),
                 "float_vs_deploy": metrics(0.9512345678, 12.25, 0.5),
                 "fake_vs_deploy": metrics(1.0, math.inf, 0.0, max_lsb=0.0)},
        saturation={"fake": Saturation(0.125, 0.0625, 0.0625, 9, 72),
                    "deploy": Saturation(0.25, 0.125, 0.125, 18, 72)},
    )
    fc = LayerReport(
        layer="fc", layer_type="InnerProduct", blob="fc", quant_layer="", scale_d=None, offset_d=None,
        shape=(2, 3), is_output=True,
        metrics={"float_vs_fake": metrics(0.999, 30.0, 0.01), "float_vs_deploy": None,
                 "fake_vs_deploy": None},
        saturation={},
    )
    out = OutputReport("fc", (2, 3), dict(fc.metrics))
    return ReportResult([conv, fc], [out], 0.99, ["conv<1>"], PAIRS, inputs, 2, 5, "caffe",
                        {"float": "f.prototxt + f.caffemodel", "fake": "q.prototxt + q.caffemodel",
                         "deploy": "d.prototxt + d.caffemodel"})


def text_of(page: str) -> str:
    """The page's text as a reader sees it: tags gone, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_the_template_ships_as_package_data():
    template = importlib.resources.files("amct_caffe.analysis") / "templates" / "report.html.j2"
    assert template.is_file()


def test_html_escapes_and_formats_cells():
    pngs = {"cosine.png": b"\x89PNG one", "worst_1.png": b"\x89PNG two"}
    page = render.render_html(hand_result(), pngs)
    # autoescape: a layer name with markup characters stays text
    assert "conv<1>" not in page and "conv&lt;1&gt;" in page
    rows = re.findall(r"<tr[^>]*>.*?</tr>", page, re.S)
    conv_row = next(r for r in rows if "conv&lt;1&gt;_quant_layer" in r)
    assert conv_row.startswith('<tr class="skip">')
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", conv_row, re.S)]
    # layer, type, blob, Quant, scale_d (.6g), offset_d, saturation fake / deploy (.3f %), then per pair
    # cosine (.6f), SNR (.2f), max abs (.4g), and max LSB (.3f)
    assert cells == ["conv<1>", "Convolution", "conv<1>", "conv<1>_quant_layer", "0.0125", "-7",
                     "12.500% / 25.000%", "0.950000", "12.50", "0.25", "0.951235", "12.25", "0.5",
                     "1.000000", "inf", "0", "0.000"]
    fc_row = next(r for r in rows if "<td>fc</td><td>InnerProduct" in r)
    assert 'class="skip"' not in fc_row
    fc_cells = re.findall(r"<td>(.*?)</td>", fc_row, re.S)
    assert fc_cells[4:7] == ["-", "-", "-"]  # no Quant layer found, no saturation
    assert fc_cells[10:] == ["-"] * 7  # pairs not measured
    out_row = next(r for r in rows if r.startswith("<tr><td>fc</td><td>[2, 3]</td>"))
    assert out_row.count("<td>-</td>") == 7
    # the page stands alone: each plot is embedded as a data: URI of its PNG bytes
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page)
    assert [(base64.b64decode(data), name) for data, name in images] == [(v, k) for k, v in pngs.items()]
    assert "src=\"cosine.png\"" not in page
    text = text_of(page)
    assert "Candidates to skip (cosine < 0.99): conv<1> Hint: set \"retrain_enable\": false" in text
    assert "Inputs: given, 2 batch(es), seed 5; deploy Quant formula caffe." in text
    assert "fake-quant: q.prototxt + q.caffemodel" in text and "Note: random" not in text
    assert "cos float vs fake-quant SNR dB float vs fake-quant max abs float vs fake-quant" in text
    assert "max LSB fake-quant vs deploy" in text
    assert "The LSB column is the largest difference between the fake-quant and the deploy model" in text
    assert "Accuracy" not in text  # no Accuracy layer


def test_html_and_table_show_accuracy():
    result = hand_result()
    result.accuracy = {"acc": {"float": 0.75, "fake": 0.5, "deploy": 0.625}}
    text = text_of(render.render_html(result, {}))
    assert "Accuracy Accuracy top float fake-quant deploy acc 0.7500 0.5000 0.6250" in text
    assert "accuracy (mean over the batches): acc: float 0.7500, fake-quant 0.5000, deploy 0.6250" in \
        render.format_table(result)
    assert json.loads(render.render_json(result, []))["accuracy"] == result.accuracy


def test_html_notes_random_inputs_and_no_candidates():
    result = hand_result("random")
    result.skip_candidates = []
    text = text_of(render.render_html(result, {}))
    assert "Note: random inputs: these numbers measure the numerics of quantization, not accuracy" in text
    assert "No layer is below the cosine threshold 0.99." in text and "<figure" not in text


def test_json_is_strict_and_keeps_the_report_keys():
    data = json.loads(render.render_json(hand_result(), ["snr.png", "cosine.png"]))
    assert data["plots"] == ["cosine.png", "snr.png"]
    conv = data["layers"][0]
    assert set(conv["float_vs_fake"]) == {"cosine", "snr_db", "max_abs", "count", "max_lsb"}
    assert conv["fake_vs_deploy"]["snr_db"] == "inf"
    assert conv["saturation"]["deploy"] == {"rate": 0.25, "low_rate": 0.125, "high_rate": 0.125,
                                           "clipped": 18, "total": 72}
    assert conv["skip_candidate"] is True and conv["worst_cosine"] == 0.95
    assert data["layers"][1]["float_vs_deploy"] is None and data["outputs"][0]["blob"] == "fc"


def test_text_table():
    table = render.format_table(hand_result())
    lines = table.splitlines()
    conv = next(line for line in lines if line.startswith("*conv<1>"))
    assert conv.split() == ["*conv<1>", "Convolution", "12.500", "0.950000", "12.50", "0.25", "0.951235",
                            "12.25", "0.5", "1.000000", "inf", "0", "0.000"]
    fc = next(line for line in lines if line.startswith(" fc "))
    assert fc.split() == ["fc", "InnerProduct", "-", "0.999000", "30.00", "0.01"] + ["-"] * 7
    assert "candidates to skip (cosine < 0.99): conv<1>" in table


def test_agreement_table():
    rows = [BlobAgreement("data", "data", "real", (1, 3), 0.0, None, None, 1.0, 0.0),
            BlobAgreement("c_quant_layer", "c_quant_layer", "codes", (1, 3), 0.0125, 0.0125, 1.0, 0.99, 0.01,
                          flips=2),
            BlobAgreement("c", "c_dequant_layer", "real", (1, 3), 1e-7, 0.0125, 8e-6, 1.0, 1e-8, True)]
    lines = render.format_agreement(rows).splitlines()
    assert lines[0].split() == ["blob", "kind", "max_abs", "max_lsb", "cosine", "rel_err", "flips"]
    assert lines[1].split() == ["data", "real", "0", "-", "1.0000000", "0", "-"]
    assert lines[2].split() == ["c_quant_layer", "codes", "0.0125", "1.000", "0.9900000", "0.01", "2"]
    assert lines[3].split() == ["c", "real", "1e-07", "0.000", "1.0000000", "1e-08", "-", "(output)"]
