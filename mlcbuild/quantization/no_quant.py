"""q0f32 / q0f16 / q0bf16: weights stored in the model dtype, nothing replaced."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlcbuild.quantization import QuantizationSpec
from mlcbuild.quantization.scheme import QuantizeMap, numpy_dtype


def quantize_model(model: Any, spec: QuantizationSpec) -> QuantizeMap:
    model.to(spec.model_dtype)
    return {}


def quantize_tensor(array: np.ndarray, spec: QuantizationSpec) -> list[np.ndarray]:
    return [np.ascontiguousarray(array.astype(numpy_dtype(spec.model_dtype)))]
