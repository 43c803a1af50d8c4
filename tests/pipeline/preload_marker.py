"""Imported by a builder process that preloads it (tests/pipeline/test_local_backend.py): appends the
process's pid to the file named by $MLCBUILD_TEST_PRELOAD_MARKER."""

import os

if os.environ.get("MLCBUILD_TEST_PRELOAD_MARKER"):
    with open(os.environ["MLCBUILD_TEST_PRELOAD_MARKER"], "a") as marker:
        marker.write(f"{os.getpid()}\n")
