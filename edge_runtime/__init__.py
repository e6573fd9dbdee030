"""Torch-free edge runtime of hidiff (numpy, onnxruntime and the native ``_packed`` kernels)."""
