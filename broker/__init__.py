"""gpu-broker: rent out a local AI server's idle GPUs and hand them back on demand."""

__version__ = "0.1.0"
