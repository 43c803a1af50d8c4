"""Device names as recipes spell them, parsed into what the compiler and runtime need.

``cpu`` means "this host's CPU" (the compile stage resolves it to the host CPU name, which
enters the node key); ``cpu:<mcpu>`` names an x86-64 level or CPU for portable artifacts;
``cuda:sm_XX`` names a CUDA compute capability.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DEVICE_KINDS = ("cpu", "cuda")
_CPU = re.compile(r"^cpu(?::(?P<mcpu>[A-Za-z0-9_.+-]+))?$")
_CUDA = re.compile(r"^cuda:sm_(?P<arch>[0-9]{2,3}[a-z]?)$")


class DeviceSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["cpu", "cuda"]
    arch: str | None = None  # mcpu for cpu (None = host), "sm_90" for cuda

    @property
    def name(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def dirname(self) -> str:
        """The device as a file-name component (no colon)."""
        return self.name.replace(":", "-")


def parse_device(text: str) -> DeviceSpec:
    m = _CPU.match(text)
    if m:
        return DeviceSpec(kind="cpu", arch=m.group("mcpu"))
    m = _CUDA.match(text)
    if m:
        return DeviceSpec(kind="cuda", arch=f"sm_{m.group('arch')}")
    raise ValueError(
        f"{text!r} is not a known device; expected 'cpu', 'cpu:<mcpu>' (e.g. cpu:x86-64-v3, "
        "cpu:znver4) or 'cuda:sm_XX' (e.g. cuda:sm_80, cuda:sm_90)"
    )


def target_dict(device: DeviceSpec) -> dict[str, Any]:
    """The TVM 0.27 target (a JSON dict: the string form is refused) for a device."""
    if device.kind == "cpu":
        from mlcbuild.toolchain import host_cpu

        return {"kind": "llvm", "mcpu": device.arch or host_cpu()}
    # Limits every CUDA GPU since sm_50 meets (the 48 KiB static shared memory any kernel may
    # use); the host side stays generic x86-64 so the library loads on any server CPU.
    return {
        "kind": "cuda",
        "arch": device.arch,
        "max_shared_memory_per_block": 49152,
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "host": {"kind": "llvm"},
    }
