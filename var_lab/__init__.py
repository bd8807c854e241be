"""var-lab: scaling-law studies of next-scale visual autoregressive models (VAR) with PyTorch Lightning."""

__version__ = "0.1.0"
