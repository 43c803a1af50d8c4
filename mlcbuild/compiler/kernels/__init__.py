"""Kernel schedules and kernels of our own, per device family (TVM's defaults leave CPU kernels
unscheduled): ``cpu_*`` for llvm targets, ``cuda_*`` for CUDA.

``apply_cpu_schedules(mod, target)`` / ``CPUSchedule(target)``: schedule the PrimFuncs of a
fused Relax module for an llvm target (see ``cpu_schedule``). Those import tvm (build side
only) and are loaded on first use.
"""

from __future__ import annotations

from typing import Any

# A note of which generation of CPU kernels this is. The compile node's key covers the code of
# these passes itself (pipeline.code_digest): forgetting to bump it rebuilds nothing stale.
SCHEDULE_VERSION = "15"

_LAZY = {"CPUSchedule", "apply_cpu_schedules", "last_report", "vector_lanes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mlcbuild.compiler.kernels import cpu_schedule

        return getattr(cpu_schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SCHEDULE_VERSION", "CPUSchedule", "apply_cpu_schedules", "last_report", "vector_lanes"]
