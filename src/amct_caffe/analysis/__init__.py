"""Per-layer analysis of quantized models: float vs fake-quant vs deploy.

Two entry points, each a short flow over the modules below:

* :func:`amct_caffe.analysis.report.compare_report`: the per-layer report (table, JSON, HTML, plots);
* :func:`amct_caffe.analysis.compare.compare_models`: blob-by-blob agreement of the fake-quant and the
  deploy model, in output quantization steps.

Modules: ``collect`` runs the nets and gathers per-blob values (the only code that calls the deploy
emulation); ``metrics`` holds the agreement and saturation accumulators; ``results`` the result records and
their JSON form; ``render`` the text tables, the HTML page (``templates/report.html.j2``) and the plots.
"""
