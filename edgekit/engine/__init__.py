"""TensorRT engines: the build plan (pure Python), the builder adapter, compatibility checks, the selftest.

Nothing in this package imports TensorRT at import time; :func:`edgekit.runtime.trt_compat.import_tensorrt`
does, and only after the GPU probe succeeded. Submodules are imported where they are used.
"""
