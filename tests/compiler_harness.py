"""Test helpers for the compiler stages: tiny HF checkpoints, running stages without the
engine, and a minimal driver of a compiled library (prefill every position, greedy decode).

The driver is deliberately independent of mlcbuild.runtime: it checks the compiled artifacts
against transformers, not against our own runtime.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, LIBRARY_FILE, TENSOR_CACHE_FILE
from mlcbuild.pipeline.stage import StageContext

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_checkpoint(arch: str, directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random HF checkpoint (config.json + model.safetensors) of ``arch``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY)
    if arch == "llama":
        cls, cfg_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
        kwargs.update(rope_theta=10000.0)
    elif arch == "mistral":
        cls, cfg_cls = transformers.MistralForCausalLM, transformers.MistralConfig
        kwargs.update(sliding_window=4096, head_dim=16)
    elif arch == "qwen2":
        cls, cfg_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
        kwargs.update(tie_word_embeddings=True)
    elif arch == "phi":
        cls, cfg_cls = transformers.PhiForCausalLM, transformers.PhiConfig
        kwargs.update(num_key_value_heads=4, partial_rotary_factor=0.5, hidden_act="gelu_new")
    else:
        raise ValueError(arch)
    kwargs.update(copy.deepcopy(overrides))  # transformers edits dicts it is given
    # Wider init than the HF default: logits of a random tiny model are nearly flat at 0.02,
    # which makes greedy decoding decide on ties; 0.1 gives clear argmaxes.
    config = cfg_cls(initializer_range=0.1, **kwargs)
    model = cls(config).eval()
    # HF initializes biases to 0 and norm weights to 1, which would hide mapping mistakes in
    # them: perturb every 1-D parameter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def run_stage(stage: Any, params: Any, inputs: dict[str, Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out.parent))
    ctx = StageContext(
        params=params, inputs=inputs, out=out, work=work, toolchain={}, key="test",
        log=lambda msg: logging.getLogger("mlcbuild.test").info(msg),
    )
    stage.run(ctx)
    return out


def build_parts(checkpoint: Path, root: Path, quantization: str, device: str = "cpu", **overrides: Any) -> dict[str, Path]:
    """gen_config -> convert_weight -> compile on a checkpoint; returns the output dirs."""
    from mlcbuild.stages.compile import Compile, CompileParams
    from mlcbuild.stages.convert_weight import ConvertWeight, ConvertWeightParams
    from mlcbuild.stages.gen_config import GenConfig, GenConfigParams

    config = run_stage(GenConfig(), GenConfigParams(quantization=quantization, **overrides), {"source": checkpoint}, root / "config")
    weights = run_stage(ConvertWeight(), ConvertWeightParams(quantization=quantization), {"source": checkpoint, "config": config}, root / "weights")
    library = run_stage(Compile(), CompileParams(quantization=quantization, device=device), {"config": config}, root / "library")
    return {"config": config, "weights": weights, "library": library}


def load_params(weights: Path, device: Any) -> list[Any]:
    """The weight tensors in index order (the order the packed ``params`` argument takes)."""
    import tvm

    index = json.loads((weights / TENSOR_CACHE_FILE).read_text())
    params_dir = (weights / TENSOR_CACHE_FILE).parent
    tensors = []
    for record in index["tensors"]:
        raw = np.fromfile(params_dir / record["shard"], dtype=np.uint8, count=record["nbytes"], offset=record["offset"])
        tensors.append(tvm.runtime.tensor(raw.view(_np_dtype(record["dtype"])).reshape(record["shape"]), device))
    return tensors


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


class CompiledModel:
    """Drives lib/model.so with tvm's VM the way an engine does (one sequence)."""

    def __init__(self, parts: dict[str, Path], device: Any = None):
        import tvm
        from tvm import relax

        self.tvm = tvm
        self.device = device or tvm.cpu()
        self.chat = json.loads((parts["config"] / CHAT_CONFIG_FILE).read_text())
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(parts["library"] / LIBRARY_FILE)), self.device)
        self.metadata = json.loads(self.vm["_metadata"]())
        self.params = load_params(parts["weights"], self.device)
        self.dtype = _np_dtype(self.chat["model_dtype"])
        self._builtin = {n: tvm.get_global_func(f"vm.builtin.{n}") for n in ("kv_state_add_sequence", "kv_state_begin_forward", "kv_state_end_forward", "kv_state_remove_sequence")}

    def new_cache(self, support_sliding_window: bool = False) -> Any:
        s = self.tvm.runtime.ShapeTuple
        c = self.chat
        return self.vm["create_paged_kv_cache"](s([c["max_batch_size"]]), s([c["context_window_size"]]), s([c["prefill_chunk_size"]]), s([self.metadata["page_size"]]), s([int(support_sliding_window)]))

    def _embed(self, ids: np.ndarray) -> Any:
        emb = self.vm["embed"](self.tvm.runtime.tensor(ids.astype("int32"), self.device), self.params)
        return emb._create_view((1, len(ids), emb.shape[-1]))

    def prefill_all(self, kv: Any, seq_id: int, ids: np.ndarray) -> np.ndarray:
        """Logits of every position [n, vocab] (batch_prefill with every position selected)."""
        b = self._builtin
        b["kv_state_begin_forward"](kv, self.tvm.runtime.ShapeTuple([seq_id]), self.tvm.runtime.ShapeTuple([len(ids)]))
        positions = self.tvm.runtime.tensor(np.arange(len(ids), dtype="int32"), self.device)
        logits = self.vm["batch_prefill"](self._embed(ids), positions, kv, self.params)
        b["kv_state_end_forward"](kv)
        return logits.numpy()[0]

    def prefill_last(self, kv: Any, seq_id: int, ids: np.ndarray) -> np.ndarray:
        b = self._builtin
        b["kv_state_begin_forward"](kv, self.tvm.runtime.ShapeTuple([seq_id]), self.tvm.runtime.ShapeTuple([len(ids)]))
        logits = self.vm["prefill"](self._embed(ids), kv, self.params)
        b["kv_state_end_forward"](kv)
        return logits.numpy()[0, -1]

    def decode(self, kv: Any, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """One decode step for several sequences (batch_decode) -> [b, vocab]."""
        b = self._builtin
        b["kv_state_begin_forward"](kv, self.tvm.runtime.ShapeTuple(seq_ids), self.tvm.runtime.ShapeTuple([1] * len(seq_ids)))
        emb = self.vm["embed"](self.tvm.runtime.tensor(np.array(tokens, dtype="int32"), self.device), self.params)
        emb = emb._create_view((len(tokens), 1, emb.shape[-1]))
        logits = self.vm["batch_decode"](emb, kv, self.params)
        b["kv_state_end_forward"](kv)
        return logits.numpy()[:, 0]

    def generate(self, ids: np.ndarray, steps: int, chunk: int | None = None) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        """Prefill (in chunks of ``chunk`` tokens if given), then ``steps`` greedy decode steps.
        Returns (prefill logits of every position, generated tokens, decode-step logits)."""
        kv = self.new_cache()
        self._builtin["kv_state_add_sequence"](kv, 0)
        chunk = chunk or len(ids)
        prefill = np.concatenate([self.prefill_all(kv, 0, ids[i : i + chunk]) for i in range(0, len(ids), chunk)])
        tokens = [int(prefill[-1].argmax())]
        step_logits = []
        for _ in range(steps - 1):
            logits = self.decode(kv, [0], [tokens[-1]])[0]
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
        return prefill, tokens, step_logits


def hf_reference(checkpoint: Path, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """transformers in float32: logits of every prompt position, greedy tokens, step logits."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return _greedy(model, ids, steps)


def stored_float_weights(checkpoint: Path, parts: dict[str, Path]) -> dict[str, np.ndarray]:
    """HF-named float32 weights reconstructed from what convert_weight stored: dequantized
    (numpy reference of the scheme) or cast back, then split along the mapping's concat.
    Loading these into transformers gives a reference that differs from our library only in
    arithmetic, not in weights."""
    from mlcbuild.models import config_from_normalized, get_architecture
    from mlcbuild.models.base_nn import build_quantized_model
    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.group_quant import dequantize_reference
    from mlcbuild.stages.convert_weight import SafetensorsSource

    chat = json.loads((parts["config"] / CHAT_CONFIG_FILE).read_text())
    config = config_from_normalized(chat["model_config"])
    spec = get_quantization(chat["quantization"])
    _, qmap = build_quantized_model(config, spec.name)
    stored = dict(zip((r["name"] for r in json.loads((parts["weights"] / TENSOR_CACHE_FILE).read_text())["tensors"]), load_params(parts["weights"], _cpu())))
    source = SafetensorsSource(checkpoint)
    out: dict[str, np.ndarray] = {}
    for name, src in get_architecture(config.model_type).weight_mapping(config).items():
        hf_shapes = [source.get(n).shape for n in src.hf_names]
        if name in qmap:
            qw, qs = (stored[n].numpy() for n in qmap[name])
            array = dequantize_reference(qw, qs, hf_shapes[0][-1], spec).astype(np.float32)
        else:
            array = stored[name].numpy().astype(np.float32)
        rows = np.cumsum([s[0] for s in hf_shapes])[:-1]
        for hf_name, part in zip(src.hf_names, np.split(array, rows, axis=0)):
            out[hf_name] = part
    return out


def _cpu() -> Any:
    import tvm

    return tvm.cpu()


def hf_reference_with(checkpoint: Path, weights: dict[str, np.ndarray], ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """hf_reference with the given HF-named weights loaded over the checkpoint's."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    return _greedy(model, ids, steps)


def _greedy(model: Any, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    import torch

    seq = torch.tensor(ids[None].astype("int64"))
    with torch.no_grad():
        prefill = model(seq).logits[0].numpy()
        tokens = [int(prefill[-1].argmax())]
        step_logits = []
        for _ in range(steps - 1):
            seq = torch.cat([seq, torch.tensor([[tokens[-1]]])], dim=1)
            logits = model(seq).logits[0, -1].numpy()
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
    return prefill, tokens, step_logits
