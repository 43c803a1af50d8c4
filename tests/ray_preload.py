"""What the fake CUDA compile of tests/ray_stages.py preloads (``Stage.preload_modules``): importing it logs
which node's worker process imported it (the nvcc node is the one started with its own cache dir)."""

import os

_log = os.environ.get("FAKE_STAGE_LOG")
if _log:
    where = "nvcc-node" if os.environ.get("MLCBUILD_CACHE_DIR") else "head"
    with open(_log, "a") as handle:
        handle.write(f"preloaded:{where}:{os.getpid()}\n")
