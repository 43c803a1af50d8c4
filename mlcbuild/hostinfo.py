"""Facts about this host that can change what a build produces, cheap to read."""

from __future__ import annotations

_CPU_FIELDS = ("model name", "flags", "vendor_id", "cpu family", "model\t")


def cpu_identity() -> str:
    """The /proc/cpuinfo lines that name this CPU's model and features (of its first core: the
    file has a block per core, ~2 KB each; empty where there is no /proc/cpuinfo). Two hosts with
    equal lines get the same code from LLVM's host-CPU detection."""
    found = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    break
                if line.startswith(_CPU_FIELDS):
                    found.append(line.rstrip("\n"))
    except OSError:
        return ""
    return "\n".join(found)
