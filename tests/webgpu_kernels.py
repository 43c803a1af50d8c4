"""Run a model's WGSL kernels through wgpu (WebGPU on Vulkan; lavapipe on a machine without a GPU) and
compare them with the same kernels compiled for the CPU.

The binding layout is the one TVM's web runtime uses (web/src/webgpu.ts): the kernel's buffer
parameters at bindings 0..n-1 in their order, then a uniform ``PODArgs`` of the scalar parameters plus
``packGridDimX``; the grid is the kernel's ``blockIdx`` extents."""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

_POD_FORMATS = {"i32": "i", "u32": "I", "f32": "f"}


def decode_kernels(chat: dict[str, Any], target_json: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, unscheduled PrimFunc, scheduled PrimFunc) of each static-shaped, single-kernel function the
    model's ``decode`` step calls, through compiler.pipeline's fusion and GPU schedules."""
    import tvm
    from tvm import relax, tirx

    from mlcbuild.compiler.kernels.cuda_schedule import CUDASchedule
    from mlcbuild.compiler.pipeline import fusion_passes
    from mlcbuild.models import config_from_normalized
    from mlcbuild.models.base_nn import build_quantized_model

    target = tvm.target.Target(target_json)
    model, _ = build_quantized_model(config_from_normalized(chat["model_config"]), chat["quantization"], target)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        fused = tvm.transform.Sequential(fusion_passes())(mod)
        # (the schedule pass may update the module in place: keep the unscheduled functions first)
        unscheduled = {gv.name_hint: func for gv, func in fused.functions_items() if isinstance(func, tirx.PrimFunc)}
        scheduled = CUDASchedule(target)(fused)
    called = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op.name == "relax.call_tir" and isinstance(expr.args[0], tvm.ir.GlobalVar):
            called.append(expr.args[0].name_hint)

    relax.analysis.post_order_visit(fused["decode"], visit)
    kernels = []
    for name in dict.fromkeys(called):
        if name.startswith("reshape"):
            continue  # views at run time (RewriteDataflowReshape), no kernel
        before, after = unscheduled[name], scheduled[name]
        shapes = [param.shape for param in before.params]
        if any(not isinstance(dim, tirx.IntImm) for shape in shapes for dim in shape):
            continue  # symbolic: the engine's shapes, not one decode step's
        if after.script().count('thread="blockIdx.x"') != 1 or "blockIdx.z" in after.script():
            continue  # several kernels in one function: the host code sequences them
        kernels.append((name, before, after))
    return kernels


def grid_of(func: Any) -> tuple[int, int, int]:
    """The (x, y, z) workgroup counts of a single-kernel scheduled PrimFunc."""
    text = func.script()
    dims = []
    for axis in "xyz":
        m = re.search(rf"T\.thread_binding\((?:T\.int64\()?(\d+)\)?, thread=\"blockIdx\.{axis}\"", text)
        dims.append(int(m.group(1)) if m else 1)
    return dims[0], dims[1], dims[2]


def build_wgsl(func: Any, name: str, target_json: dict[str, Any]) -> str:
    import tvm

    target = tvm.target.Target(target_json)
    with target:
        lib = tvm.tirx.build(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
    device = [m for m in lib.mod.imports if m.kind == "webgpu"] if hasattr(lib, "mod") else [m for m in lib.imports if m.kind == "webgpu"]
    return str(device[0].inspect_source(""))


def random_inputs(func: Any, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for param in func.params:  # TVM 0.27: a buffer parameter is the buffer (shape, dtype, name)
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        if dtype.startswith("uint"):
            arrays.append(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(dtype))
        elif dtype.startswith("int"):
            arrays.append(rng.integers(0, 8, size=shape).astype(dtype))
        else:
            arrays.append((rng.standard_normal(shape) * 0.5).astype(dtype))
    return arrays


def run_cpu(func: Any, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    import tvm

    from mlcbuild.compiler.kernels import apply_cpu_schedules

    target = tvm.target.Target({"kind": "llvm"})
    with target:  # the CPU build's own schedule of the function (compiler.kernels.cpu_schedule)
        mod = apply_cpu_schedules(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target)
        lib = tvm.compile(mod, target=target)
    tensors = [tvm.runtime.tensor(a.copy()) for a in arrays]
    lib[name](*tensors)
    return [t.numpy() for t in tensors]


def run_wgsl(device: Any, source: str, entry: str, func: Any, arrays: list[np.ndarray],
             grid: tuple[int, int, int]) -> list[np.ndarray]:
    """Dispatch kernel ``entry`` of ``source`` on ``device`` with ``arrays`` bound to the buffers the
    shader declares (by name, ``<buffer>_ptr``); returns every array after the run."""
    import wgpu

    names = [p.name for p in func.params]
    bindings = re.findall(r"@group\(0\) @binding\((\d+)\) var<storage, (read|read_write)> (\w+)_ptr", source)
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
    buffers, entries = {}, []
    for binding, _access, buf_name in bindings:
        data = arrays[names.index(buf_name)]
        buffers[buf_name] = device.create_buffer_with_data(data=np.ascontiguousarray(data).tobytes(), usage=usage)
        entries.append({"binding": int(binding), "resource": {"buffer": buffers[buf_name]}})
    pod = re.search(r"struct PODArgs \{(.*?)\}", source, re.S)
    fields = re.findall(r"(\w+): (\w+)", pod.group(1)) if pod else []
    values = []
    for field, kind in fields:
        if field == "packGridDimX":
            values.append(grid[0])
        elif field.endswith("_elem_offset"):
            values.append(0)
        else:
            raise ValueError(f"{entry}: scalar argument {field} has no value here")
    if fields:
        uniform = device.create_buffer_with_data(
            data=struct.pack("<" + "".join(_POD_FORMATS[k] for _, k in fields), *values),
            usage=wgpu.BufferUsage.UNIFORM)
        binding = int(re.search(r"@binding\((\d+)\) var<uniform> podArgs", source).group(1))
        entries.append({"binding": binding, "resource": {"buffer": uniform}})
    module = device.create_shader_module(code=source)
    pipeline = device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": entry})
    encoder = device.create_command_encoder()
    compute = encoder.begin_compute_pass()
    compute.set_pipeline(pipeline)
    compute.set_bind_group(0, device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries))
    compute.dispatch_workgroups(*grid)
    compute.end()
    device.queue.submit([encoder.finish()])
    out = []
    for buf_name, data in zip(names, arrays):
        if buf_name in buffers:
            raw = device.queue.read_buffer(buffers[buf_name])
            out.append(np.frombuffer(raw, dtype=data.dtype).reshape(data.shape))
        else:
            out.append(data)
    return out
