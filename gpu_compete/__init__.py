"""gpu-compete: queue experiments onto shared multi-GPU servers without a cluster scheduler."""

__version__ = "0.1.0"
