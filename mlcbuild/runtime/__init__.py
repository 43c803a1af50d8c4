"""Run bundles: one continuous-batching engine (``engine``) under the Python API (``api``), the
OpenAI-compatible server (``server``) and the chat CLI (``chat``). Imports tvm's runtime, numpy,
tokenizers and the web stack; never the compiler side of mlcbuild."""
