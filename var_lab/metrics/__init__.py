"""Evaluation metrics: FID, KID, precision/recall (and IS with the original weights) through torch-fidelity.

``fid_weights`` installs the FID Inception weights offline (``var-lab fid-weights``); ``fid`` extracts Inception
features batched on the GPU when there is one, caches reference statistics and computes the metrics.
"""
