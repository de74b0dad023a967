"""plot_ds: preference learning of large language models with PLOT on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
