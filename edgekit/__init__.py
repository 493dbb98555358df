"""edgekit: distilled DeepSeek-R1 models on small devices.

Importing this package does nothing but define the version: no logging setup, no CUDA, no TensorRT.
"""

__version__ = "0.2.0"
