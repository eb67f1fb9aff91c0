"""Kernels: FP8 quantization and GEMM (PyTorch references + Triton on CUDA)."""
