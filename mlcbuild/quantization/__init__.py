"""Quantization schemes, by name.

This module is pure data so that recipe validation can name the known schemes without
importing the compiler. The code that applies a scheme (to weights and to the Relax model)
lives in one file per scheme family next to this one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class QuantizationSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["none", "group"]
    model_dtype: Literal["float32", "float16", "bfloat16"]
    bits: int = 16  # bits per stored weight element (group kinds only are < 16)
    group_size: int = 0
    storage_dtype: str = "uint32"  # what quantized elements are packed into


QUANTIZATIONS: dict[str, QuantizationSpec] = {
    spec.name: spec
    for spec in (
        QuantizationSpec(name="q0f32", kind="none", model_dtype="float32", bits=32),
        QuantizationSpec(name="q0f16", kind="none", model_dtype="float16"),
        QuantizationSpec(name="q0bf16", kind="none", model_dtype="bfloat16"),
        QuantizationSpec(name="q4f16_1", kind="group", model_dtype="float16", bits=4, group_size=32),
        QuantizationSpec(name="q4f32_1", kind="group", model_dtype="float32", bits=4, group_size=32),
        QuantizationSpec(name="q3f16_1", kind="group", model_dtype="float16", bits=3, group_size=40),
    )
}


def get_quantization(name: str) -> QuantizationSpec:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a known quantization; known: {', '.join(QUANTIZATIONS)}"
        ) from None
