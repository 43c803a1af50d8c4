"""`mlcbuild eval ppl` gives the perplexity transformers gives on the same tokens, chunked and scored the way
llama.cpp's llama-perplexity does (non-overlapping chunks of ctx, the second half of each scored; or, with
--stride, windows of ctx every stride tokens, the last stride scored)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mlcbuild.runtime.perplexity import PerplexityError, plan_chunks
from runtime_support import CORPUS, tiny  # noqa: F401  (the session's tiny bundle)

TEXT = " ".join(CORPUS * 12)


def reference_ppl(checkpoint, tokens: list[int], ctx: int, stride: int = 0) -> float:
    """llama-perplexity's formula, computed with transformers (float32) on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if stride:
        windows = [(i * stride, ctx - stride - 1) for i in range((len(tokens) - ctx + stride - 1) // stride)]
    else:
        windows = [(i * ctx, ctx // 2) for i in range(len(tokens) // ctx)]
    nll = []
    with torch.no_grad():
        for start, first in windows:
            ids = torch.tensor([tokens[start: start + ctx]])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for j in range(first, ctx - 1):
                nll.append(-float(logp[j, tokens[start + j + 1]]))
    return math.exp(sum(nll) / len(nll))


def eval_ppl(recipe, text_file, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcbuild", "eval", "ppl", str(recipe), "--text", str(text_file), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,stride", [(("--ctx", "64"), 0), (("--ctx", "48", "--stride", "16"), 16)],
                         ids=["chunks", "stride"])
def test_eval_ppl_matches_transformers(tiny, tmp_path, args, stride):  # noqa: F811
    from tokenizers import Tokenizer

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    done = eval_ppl(tiny.recipe, text_file, *args, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    tokens = Tokenizer.from_file(str(tiny.path / "tokenizer.json")).encode(TEXT).ids
    ctx = int(args[1])
    expected = reference_ppl(tiny.checkpoint, tokens, ctx, stride)
    print(f"mlcbuild {result['ppl']:.6f}, transformers {expected:.6f}")
    assert result["text_tokens"] == len(tokens) and result["ctx"] == ctx and result["stride"] == stride
    assert result["chunks"] == len(plan_chunks(len(tokens), ctx, stride))
    assert result["scored_tokens"] == result["chunks"] * (stride or ctx - 1 - ctx // 2)
    assert result["ppl"] == pytest.approx(expected, rel=1e-4)
    assert 0 < result["ppl_error"] < result["ppl"]


def test_eval_ppl_human_output_and_errors(tiny, tmp_path):  # noqa: F811
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    done = eval_ppl(tiny.recipe, text_file, "--ctx", "64", "--chunks", "2")
    assert done.returncode == 0, done.stderr
    assert "PPL = " in done.stdout and "[2 chunks of 64, 62 of" in done.stdout
    short = tmp_path / "short.txt"
    short.write_text("The capital of France is Paris.")
    done = eval_ppl(tiny.recipe, short, "--ctx", "64")
    assert done.returncode == 2 and "a context of 64 needs at least 128" in done.stderr
    done = eval_ppl(tiny.recipe, text_file, "--ctx", "512")
    assert done.returncode == 2 and "larger than the bundle's context window (256)" in done.stderr
    done = eval_ppl(tiny.recipe, tmp_path / "missing.txt")
    assert done.returncode == 2 and "--text: cannot read" in done.stderr


def test_chunk_plans_follow_llama_perplexity():
    chunks = plan_chunks(1000, 256)
    assert [(c.start, c.first) for c in chunks] == [(0, 128), (256, 128), (512, 128)]  # the 232-token tail dropped
    assert list(chunks[0].positions) == list(range(128, 255))
    strided = plan_chunks(1000, 256, stride=64)
    assert len(strided) == (1000 - 256 + 63) // 64 and strided[1].start == 64 and strided[0].first == 256 - 64 - 1
    assert len(plan_chunks(1000, 256, max_chunks=2)) == 2
    for bad in ((100, 64, 0), (100, 64, 64), (100, 2, 0)):
        with pytest.raises(PerplexityError):
            plan_chunks(*bad)
