"""Compute kernels of the worker: each has a torch path (CPU, reference) beside its Triton path (CUDA)."""
