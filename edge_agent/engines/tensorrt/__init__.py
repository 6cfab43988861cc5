"""The TensorRT engine: ``build`` compiles the bundle's ONNX to a plan (with ``graph_check`` and ``ops``
checking the graph first), ``cache`` keeps plans per GPU and TensorRT version, ``prebuild`` builds one
before an update switches to it, and ``runtime`` runs a plan with ``cuda_buffers``.

Nothing here imports ``tensorrt`` at import time, so the CPU-only checks run on any box.
"""
