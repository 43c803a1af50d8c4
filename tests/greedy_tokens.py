"""Greedy tokens and logits of a bundle, through the mlcbuild runtime (prefill, then decode steps).

    python greedy_tokens.py BUNDLE PROMPT_IDS(comma separated) STEPS  -> JSON {"tokens", "logits"}

Run by the device tests on x86-64 and, for the aarch64 bundle, by an aarch64 Python under qemu-user."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import CompiledModel

    path, prompt_text, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bundle = Bundle.open(path, device="cpu")
    cc = bundle.chat_config
    model = CompiledModel(bundle, 1, 4 * cc.page_size, cc.prefill_chunk_size, cc.page_size)
    model.add_sequence(0)
    logits = model.forward_prefill([0], [[int(t) for t in prompt_text.split(",")]])[0]
    tokens, rows = [int(logits.argmax())], [logits]
    for _ in range(steps - 1):
        logits = model.forward_decode([0], [tokens[-1]])[0]
        tokens.append(int(logits.argmax()))
        rows.append(logits)
    print(json.dumps({"device": bundle.manifest.device, "tokens": tokens, "logits": [r.tolist() for r in rows]}))


if __name__ == "__main__":
    main()
