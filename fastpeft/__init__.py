"""fastpeft: kernel-accelerated adapters for LLM post-training.

Importing fastpeft initialises no CUDA context and compiles nothing.
"""

__version__ = "0.1.0"
