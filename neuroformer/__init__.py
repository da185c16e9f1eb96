"""neuroformer: training platform for foundation models of brain data."""

__version__ = "0.1.0"
