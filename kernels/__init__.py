"""Triton kernels for fastpeft, each with its torch reference and autograd wrapper.

Importing this package compiles nothing and never touches CUDA: kernels are compiled lazily on
first launch. Which implementation runs is decided in one place, :mod:`fastpeft.kernels.backend`.
"""

from fastpeft.kernels.backend import backend, force_backend, interpreting

__all__ = ["backend", "force_backend", "interpreting"]
