"""Triton kernels of effllm, installed as `effllm.kernels`.

Each kernel file holds the `@triton.jit` kernel, its launcher, and a plain-PyTorch reference of
the same function; tests hold the two to each other (on CPU under TRITON_INTERPRET=1).
"""
