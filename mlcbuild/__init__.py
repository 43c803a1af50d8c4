"""mlcbuild: turn an open LLM checkpoint into fast, reproducible, deployable artifacts, and run them."""

__version__ = "0.1.0"

__all__ = ["AsyncMLCEngine", "EngineConfig", "MLCEngine", "__version__"]


def __getattr__(name: str):  # lazy: `import mlcbuild` must not load tvm or the web stack
    if name in ("MLCEngine", "AsyncMLCEngine", "EngineConfig"):
        from mlcbuild.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlcbuild' has no attribute {name!r}")
