"""Compiler passes of our own (TVM's defaults leave CPU kernels unscheduled).

``apply_cpu_schedules(mod, target)`` / ``CPUSchedule(target)``: schedule the PrimFuncs of a
fused Relax module for an llvm target (see ``cpu_schedule``). Imports tvm: build side only.
"""

from mlcbuild.compiler_passes.cpu_schedule import CPUSchedule, apply_cpu_schedules, last_report, vector_lanes

__all__ = ["CPUSchedule", "apply_cpu_schedules", "last_report", "vector_lanes"]
