"""var-lab analysis: MLflow runs -> pandas, scaling-law fits with bootstrap intervals, plots and reports.

Modules (imported on demand, so ``import analysis`` stays light):

* :mod:`analysis.runs`: load experiments into the runs frame and the long history frame (sqlite fast path).
* :mod:`analysis.fit`: ``y = (a x)^b``, ``y = E + A x^-alpha``, Chinchilla approach 3
  (:func:`analysis.fit.fit_chinchilla`), bootstrap intervals, compute-optimal frontier, IsoFLOP minima, N(C) / D(C),
  extrapolation.
* :mod:`analysis.plots`: log-log scaling plots saved as PNG and SVG.
* :mod:`analysis.report`: the whole analysis into a folder (``var-lab analyze``, :mod:`analysis.cli`).
* :mod:`analysis.synthetic`: planted studies written to a real MLflow store (tests, notebook, benchmarks).

Typical use::

    from analysis.runs import load_study
    from analysis.report import analyze

    study = load_study(["var-imagenet256"], "sqlite:///runs/mlflow.db")
    result = analyze(study, "reports/scaling")
"""
