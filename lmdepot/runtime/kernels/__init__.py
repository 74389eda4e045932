"""Triton kernels, one per file, each with its launcher and torch reference (`reference`).

On machines without a GPU the kernels run under TRITON_INTERPRET=1 in tests only; the runtime uses
the torch references there.
"""
