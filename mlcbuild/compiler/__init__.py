"""The compiler: from a chat config and a device to a library (build side only; imports tvm lazily).

    build.py      build_library: the Relax module, lowered and linked for one device (the compile
                  stage's work), and the ahead-of-time CUDA fatbin
    pipeline.py   the Relax pass pipeline: bounds, fusion, the device's kernel schedules, lowering
    fusion.py     Relax fusions of our own (dequantize into matmul, casts into norms)
    kernels/      kernel schedules and hand-written kernels per device family (cpu_*, cuda_*), and
                  what they share: the matmul matcher, TIR expression helpers
"""
