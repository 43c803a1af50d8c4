"""gen_config: HF checkpoint directory -> mlc-chat-config.json + the tokenizer files.

The architecture's config is validated and normalized here (unsupported fields fail the build
with a message naming them), the recipe's overrides are applied, and the generation defaults
and special token ids are collected, so that later stages and the runtime read one file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlcbuild.bundle_format import CHAT_CONFIG_FILE, KNOWN_CONV_TEMPLATES, ChatConfig
from mlcbuild.pipeline.stage import Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import LoadedRecipe
from mlcbuild.stages import register_stage

# Copied verbatim when present (generation_config.json too: runtimes that read it directly).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)

DEFAULT_PREFILL_CHUNK = 2048
DEFAULT_MAX_BATCH = 8


class GenConfigParams(StageParams):
    quantization: str
    conv_template: str = "auto"
    context_window_size: int | None = None
    prefill_chunk_size: int | None = None
    sliding_window_size: int | None = None
    max_batch_size: int | None = None
    tensor_parallel_shards: int = 1


@register_stage
class GenConfig(Stage):
    name = "gen_config"
    version = 1
    Params = GenConfigParams

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> GenConfigParams:
        recipe = loaded.recipe
        if recipe.conv_template not in KNOWN_CONV_TEMPLATES:
            raise StageError(
                f"conv_template {recipe.conv_template!r} is not known; known: "
                f"{', '.join(KNOWN_CONV_TEMPLATES)}"
            )
        o = recipe.overrides
        return GenConfigParams(
            quantization=axes["quantization"],
            conv_template=recipe.conv_template,
            context_window_size=o.context_window_size,
            prefill_chunk_size=o.prefill_chunk_size,
            sliding_window_size=o.sliding_window_size,
            max_batch_size=o.max_batch_size,
            tensor_parallel_shards=int(axes.get("tensor_parallel_shards") or o.shard_counts()[0]),
        )

    def run(self, ctx: StageContext) -> None:
        source = ctx.inputs["source"]
        chat = make_chat_config(source, ctx.params)
        (ctx.out / CHAT_CONFIG_FILE).write_text(
            chat.model_dump_json(by_alias=True, indent=2) + "\n", encoding="utf-8"
        )
        for name in chat.tokenizer_files:
            shutil.copyfile(source / name, ctx.out / name)
        ctx.log(
            f"gen_config: {chat.model_type} {chat.quantization}, context {chat.context_window_size}, "
            f"prefill chunk {chat.prefill_chunk_size}, tokenizer files: {', '.join(chat.tokenizer_files) or 'none'}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageError(f"{path.name} is not valid JSON: {exc}") from None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template(source: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The HF chat template: chat_template.jinja wins over tokenizer_config.json (newer
    transformers save it there); a list of named templates picks "default"."""
    jinja = source / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def make_chat_config(source: Path, params: GenConfigParams) -> ChatConfig:
    """Build the chat config from an HF checkpoint directory (pure: no tvm)."""
    from mlcbuild.models import UnsupportedConfigError, config_from_hf
    from mlcbuild.quantization import get_quantization

    hf = _read_json(source / "config.json")
    if not hf:
        raise StageError(f"{source} has no config.json: not a Hugging Face checkpoint")
    try:
        config = config_from_hf(hf)
    except UnsupportedConfigError as exc:
        raise StageError(str(exc)) from None
    spec = get_quantization(params.quantization)
    # The first point where the model's shape is known: a shard count it cannot be split into fails
    # here, before any weight is converted or library compiled (models/sharding.py says why).
    from mlcbuild.models.sharding import ShardingError, check_plan

    try:
        check_plan(config, params.tensor_parallel_shards, spec.group_size if spec.kind == "group" else 0)
    except ShardingError as exc:
        raise StageError(str(exc)) from None

    context = params.context_window_size or config.max_position_embeddings
    sliding = params.sliding_window_size or config.sliding_window or -1
    prefill = min(params.prefill_chunk_size or DEFAULT_PREFILL_CHUNK, context)
    if sliding > 0 and not params.prefill_chunk_size:
        # The KV cache slides between forward calls, so a chunk sees up to window-1 cached
        # tokens plus itself: chunks no longer than the window keep that close to the model.
        prefill = min(prefill, sliding)

    generation = _read_json(source / "generation_config.json")
    tokenizer_config = _read_json(source / "tokenizer_config.json")
    eos = _id_list(generation.get("eos_token_id", hf.get("eos_token_id")))
    bos = generation.get("bos_token_id", hf.get("bos_token_id"))
    pad = generation.get("pad_token_id", hf.get("pad_token_id"))
    defaults: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "max_new_tokens"):
        if generation.get(key) is not None:
            defaults[key] = generation[key]
    if defaults.get("do_sample") is False:
        # Greedy by the checkpoint's own choice: say so with temperature 0 (what runtimes read).
        defaults["temperature"] = 0.0

    return ChatConfig(
        model_type=config.model_type,
        model_config=config.model_dump(mode="json"),
        quantization=spec.name,
        model_dtype=spec.model_dtype,
        vocab_size=config.vocab_size,
        context_window_size=context,
        prefill_chunk_size=prefill,
        sliding_window_size=sliding,
        tensor_parallel_shards=params.tensor_parallel_shards,
        max_batch_size=params.max_batch_size or DEFAULT_MAX_BATCH,
        conv_template=params.conv_template,
        chat_template=_chat_template(source, tokenizer_config),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=eos,
        pad_token_id=None if pad is None else int(pad),
        tokenizer_files=[name for name in TOKENIZER_FILES if (source / name).is_file()],
        **defaults,
    )
