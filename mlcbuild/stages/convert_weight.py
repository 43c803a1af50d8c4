"""convert_weight: HF safetensors -> params/params_shard_<N>.bin + params/tensor-cache.json.

Streams one tensor at a time (never the whole model): for each parameter of the quantized model
in order, read its HF source tensors, apply the architecture's mapping transform, quantize with
the scheme, and append the bytes to the current shard file. Peak memory is about the largest
mapped tensor (plus its quantized form); output bytes depend only on the inputs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, TENSOR_CACHE_FILE, TensorCacheIndex, TensorRecord
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import LoadedRecipe
from mlcbuild.stages import key_params_sharded, register_stage

if TYPE_CHECKING:  # numpy is imported where arrays are made: a no-op `mlcbuild run` imports every
    import numpy as np  # stage module to key its nodes, and numpy alone is ~0.1 s of that

SHARD_BYTES = 32 * 1024 * 1024
CONVERT_BASE_MEMORY = 1 << 30  # see ConvertWeight.resources


class ConvertWeightParams(StageParams):
    quantization: str
    shard_bytes: int = SHARD_BYTES
    # >1: each tensor-parallel shard's slice of every weight, in files of its own (models/sharding.py)
    tensor_parallel_shards: int = 1


@register_stage
class ConvertWeight(Stage):
    name = "convert_weight"
    version = 1
    Params = ConvertWeightParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> ConvertWeightParams:
        return ConvertWeightParams(quantization=axes["quantization"],
                                   tensor_parallel_shards=int(axes.get("tensor_parallel_shards") or 1))

    def key_params(self, params: ConvertWeightParams) -> dict:
        return key_params_sharded(params)

    def toolchain(self, params: ConvertWeightParams) -> dict[str, str]:
        from importlib.metadata import version

        # numpy's rounding and float casts produce the stored bytes.
        return {"numpy": version("numpy"), "ml_dtypes": version("ml_dtypes")}

    def preload_modules(self, params: ConvertWeightParams) -> list[str]:
        return ["mlcbuild.models.base_nn"]  # the model definitions, on TVM's Relax nn frontend

    def resources(self, params: ConvertWeightParams) -> Resources:
        # Streams one tensor at a time: the interpreter with numpy, plus a few copies of the
        # largest tensor (read, widened to float32, quantized). The params do not know the
        # model's size: the shard size stands for that tensor (one larger gets a shard of its own).
        return Resources(cpus=1, memory_bytes=CONVERT_BASE_MEMORY + 4 * params.shard_bytes)

    def run(self, ctx: StageContext) -> None:
        chat = json.loads((ctx.inputs["config"] / CHAT_CONFIG_FILE).read_text(encoding="utf-8"))
        if chat["quantization"] != ctx.params.quantization:
            raise StageError(
                f"config was generated for {chat['quantization']}, not {ctx.params.quantization}"
            )
        shards = ctx.params.tensor_parallel_shards
        if chat.get("tensor_parallel_shards", 1) != shards:
            raise StageError(f"config was generated for {chat.get('tensor_parallel_shards', 1)} shard(s), not {shards}")
        index = convert(ctx.inputs["source"], chat["model_config"], ctx.params.quantization, ctx.out, ctx.params.shard_bytes,
                        ctx.log, shards)
        total = sum(t.nbytes for t in index.tensors)
        ctx.log(f"convert_weight: {len(index.tensors)} tensors, {total / 2**20:.1f} MiB in {len(index.shards)} shard(s)")


# ---- safetensors reading ----------------------------------------------------------------------


class SafetensorsSource:
    """Tensor-by-tensor reader over a checkpoint's *.safetensors files."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                for name in _header(path):
                    self.files[name] = path
        if not self.files:
            raise StageError(f"{directory} has no *.safetensors weights")
        self._handles: dict[Path, Any] = {}
        self.read: set[str] = set()

    def names(self) -> set[str]:
        return set(self.files)

    def unread(self) -> list[str]:
        """Tensors no parameter came from (a tied lm_head; otherwise worth a look)."""
        return sorted(self.names() - self.read)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        try:
            path = self.files[name]
        except KeyError:
            raise StageError(f"the checkpoint has no tensor {name!r}") from None
        self.read.add(name)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="numpy")
        if handle.get_slice(name).get_dtype() == "BF16":
            # numpy has no bfloat16: read the raw bits and widen exactly to float32.
            return _read_bf16(path, name)
        return handle.get_tensor(name)


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _read_bf16(path: Path, name: str) -> np.ndarray:
    import numpy as np

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + length + begin)
        bits = np.frombuffer(f.read(end - begin), dtype="<u2").reshape(entry["shape"])
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- shard writing ----------------------------------------------------------------------------


class ShardWriter:
    """Appends tensors to params_shard_<N>.bin files of about ``limit`` bytes (a larger tensor
    gets a shard of its own) and records where each went."""

    def __init__(self, directory: Path, limit: int, prefix: str = "params_shard_", rank: int | None = None):
        self.directory, self.limit, self.prefix, self.rank = directory, limit, prefix, rank
        self.shards: list[str] = []
        self.records: list[TensorRecord] = []
        self._file: Any = None
        self._size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        import numpy as np
        import xxhash

        data = np.ascontiguousarray(array)
        payload = data.view(np.uint16).tobytes() if data.dtype.name == "bfloat16" else data.tobytes()
        if self._file is None or (self._size and self._size + len(payload) > self.limit):
            self._open_next()
        offset = self._size
        self._file.write(payload)
        self._size += len(payload)
        self.records.append(
            TensorRecord(
                name=name,
                shape=list(data.shape),
                dtype=data.dtype.name,
                shard=self.shards[-1],
                offset=offset,
                nbytes=len(payload),
                digest=xxhash.xxh3_128_hexdigest(payload),
                rank=self.rank,
            )
        )

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}{len(self.shards)}.bin"
        self.shards.append(name)
        self._file = open(self.directory / name, "wb")
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def mapped_tensors(source: SafetensorsSource, model_config: dict[str, Any], quantization: str) -> Iterator[tuple[str, np.ndarray]]:
    """(stored name, array) for every parameter of the compiled (single-shard) model, in parameter order."""
    for _, name, array in sharded_tensors(source, model_config, quantization, 1):
        yield name, array


def sharded_tensors(source: SafetensorsSource, model_config: dict[str, Any], quantization: str,
                    shards: int) -> Iterator[tuple[int, str, np.ndarray]]:
    """(rank, stored name, array) for every parameter of each shard's compiled model, in parameter
    order: the architecture's mapping gives each float parameter (read once for all shards), the
    shard plan slices it (models/sharding.py; a float weight is sliced before it is quantized, and
    the plan makes row-parallel slices whole quantization groups, so each slice is exactly the
    quantized full tensor's), the scheme turns each slice into the stored tensors. Shapes and
    dtypes are checked against the model the compile stage builds."""
    import numpy as np

    from mlcbuild.models import config_from_normalized, get_architecture
    from mlcbuild.models.base_nn import build_quantized_model
    from mlcbuild.models.sharding import ShardingError, shard_tensor
    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.scheme import family, numpy_dtype

    config = config_from_normalized(model_config)
    spec = get_quantization(quantization)
    try:
        model, qmap = build_quantized_model(config, quantization, target=None, tensor_parallel_shards=shards)
    except ShardingError as exc:
        raise StageError(str(exc)) from None
    expected = {name: (tuple(int(s) for s in p.shape), str(p.dtype)) for name, p in model.named_parameters()}
    mapping = get_architecture(config.model_type).weight_mapping(config)
    stored_from = {stored: float_name for float_name, names in qmap.items() for stored in names}
    quantizer = family(spec)

    done: set[str] = set()
    for stored_name in expected:
        float_name = stored_from.get(stored_name, stored_name)
        if float_name in done:
            continue
        done.add(float_name)
        if float_name not in mapping:
            raise StageError(f"no weight mapping for parameter {float_name!r}")
        src = mapping[float_name]
        full = src.apply([source.get(n).astype(np.float32, copy=False) for n in src.hf_names])
        for rank in range(shards):
            array = shard_tensor(config, float_name, full, shards, rank)
            if float_name in qmap:
                outputs = zip(qmap[float_name], quantizer.quantize_tensor(array, spec))
            else:  # norms, biases, unquantized weights: stored in the dtype the model declares
                outputs = zip((float_name,), [np.ascontiguousarray(array.astype(numpy_dtype(expected[float_name][1])))])
            for name, out in outputs:
                shape, dtype = expected[name]
                if tuple(out.shape) != shape or out.dtype.name != dtype:
                    raise StageError(
                        f"{name}: mapped tensor is {out.dtype.name}{list(out.shape)}, the model expects "
                        f"{dtype}{list(shape)} (from HF {', '.join(src.hf_names)})"
                    )
                yield rank, name, out


def convert(source_dir: Path, model_config: dict[str, Any], quantization: str, out: Path, shard_bytes: int = SHARD_BYTES,
            log: Any = print, tensor_parallel_shards: int = 1) -> TensorCacheIndex:
    """Write the weights as ``params/`` (TENSOR_CACHE_FILE and its files). With tensor_parallel_shards
    > 1, pre-sharded: each rank's slices in files of its own (``params_rank<R>_shard_<N>.bin``), so
    that a worker maps only its slice of the model (see .notes or the report for why not a shard map
    applied at load)."""
    source = SafetensorsSource(source_dir)
    params_dir = out / Path(TENSOR_CACHE_FILE).parent
    params_dir.mkdir(parents=True, exist_ok=True)
    shards = tensor_parallel_shards
    writers = [ShardWriter(params_dir, shard_bytes)] if shards == 1 else \
        [ShardWriter(params_dir, shard_bytes, prefix=f"params_rank{r}_shard_", rank=r) for r in range(shards)]
    try:
        for rank, name, array in sharded_tensors(source, model_config, quantization, shards):
            writers[rank].add(name, array)
    finally:
        for writer in writers:
            writer.close()
    unread = source.unread()
    if unread:
        log(f"convert_weight: {len(unread)} checkpoint tensor(s) not used: {', '.join(unread[:8])}")
    index = TensorCacheIndex(
        quantization=quantization,
        model_type=model_config["model_type"],
        shards=[name for w in writers for name in w.shards],
        tensors=[record for w in writers for record in w.records],
        tensor_parallel_shards=shards if shards > 1 else None,
    )
    # exclude_none: a single-shard index is written as before sharding existed (same bytes, same digests)
    (out / TENSOR_CACHE_FILE).write_text(index.model_dump_json(indent=1, exclude_none=True) + "\n", encoding="utf-8")
    return index
