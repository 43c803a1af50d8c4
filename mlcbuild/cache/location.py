"""Where the artifact cache lives. Kept free of heavy imports: the no-op fast path
(``mlcbuild.launcher``) needs it before anything else is loaded."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MLCBUILD_CACHE_DIR``, else the platform user cache dir (``~/.cache/mlcbuild``)."""
    env = os.environ.get("MLCBUILD_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlcbuild"))
