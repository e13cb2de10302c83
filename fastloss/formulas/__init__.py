"""The losses' formulas, each written once and shared by the CPU and CUDA kernels."""
