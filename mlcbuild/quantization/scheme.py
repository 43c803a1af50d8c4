"""Dispatch from a QuantizationSpec to the file implementing its family.

Each family module exposes:

    quantize_model(model, spec) -> QuantizeMap   converts a float nn.Module in place (dtype,
                                                   quantized replacements) and says which of its
                                                   float weights became which stored tensors
    quantize_tensor(array, spec) -> list[ndarray]  numpy: one float weight -> its stored tensors
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from mlcbuild.quantization import QuantizationSpec

# float weight name -> names of the stored tensors that replace it (in parameter order)
QuantizeMap = dict[str, tuple[str, ...]]

_FAMILIES = {"none": "mlcbuild.quantization.no_quant", "group": "mlcbuild.quantization.group_quant"}


def family(spec: QuantizationSpec) -> ModuleType:
    return importlib.import_module(_FAMILIES[spec.kind])


def numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype for a model dtype name; bfloat16 comes from ml_dtypes (a tvm dependency)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)
