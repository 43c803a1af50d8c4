"""mlcbuild: turn an open LLM checkpoint into fast, reproducible, deployable artifacts, and run them."""

__version__ = "0.1.0"
