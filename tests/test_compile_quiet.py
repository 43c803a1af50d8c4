"""A build prints no TVM noise: relax ``take`` (the token embedding, batch_prefill's logit positions) is
lowered in "clip" mode, so topi's "Fast mode segfaults when there are out-of-bounds indices" warning is
gone, and the gather still returns the right rows."""

from __future__ import annotations

import numpy as np


def test_build_prints_no_take_warning_and_embed_gathers_the_rows(tmp_path, tiny_checkpoint, capfd):
    import torch
    import transformers

    from compiler_harness import CompiledModel, build_parts

    checkpoint = tiny_checkpoint("llama")
    capfd.readouterr()
    parts = build_parts(checkpoint, tmp_path, "q0f32")
    printed = capfd.readouterr()
    assert "Fast mode segfaults" not in printed.err + printed.out
    assert "Warning" not in printed.err, printed.err

    model = CompiledModel(parts)
    weight = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    table = weight.get_input_embeddings().weight.detach().numpy()
    ids = np.array([0, 7, 3, len(table) - 1, 7], dtype=np.int32)
    rows = model.vm["embed"](model.tvm.runtime.tensor(ids, model.device), model.params).numpy()
    np.testing.assert_array_equal(rows, table[ids])
    # an id past the vocabulary is clamped to the last row (mode "clip"), never read out of bounds
    past = model.vm["embed"](model.tvm.runtime.tensor(np.array([len(table) + 5], np.int32), model.device), model.params)
    np.testing.assert_array_equal(past.numpy()[0], table[-1])
