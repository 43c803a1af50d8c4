"""Every malformed recipe gets an error naming its file, line and field, and what was expected."""

from __future__ import annotations

import pytest

from mlcbuild.recipe import RecipeError, load_recipe

GOOD = """\
name: toy
source: HF://org/model
revision: main
conv_template: auto
quantization: [q0f16, q4f16_1]
devices: [cpu, cuda:sm_80]
overrides:
  context_window_size: 2048
  prefill_chunk_size: 1024
output: dist/toy
"""

CASES = [
    # (what to replace, replacement, expected fragment)
    ("quantization: [q0f16, q4f16_1]", "quantization:\n  - q0f16\n  - q4f16",
     ":7: quantization[1]: 'q4f16' is not a known quantization; known: q0f32, q0f16, q0bf16, q4f16_1"),
    ("devices: [cpu, cuda:sm_80]", "devices: [cpu, tpu]", ":6: devices[1]: 'tpu' is not a known device; expected one of: cpu or cpu:<mcpu>"),
    ("name: toy\n", "name: toy\ncolour: blue\n", ":2: colour: unknown field; known fields: name, source, revision"),
    ("  prefill_chunk_size: 1024\n", "  prefill_chunk_size: 1024\n  context_window: 9\n",
     ":10: overrides.context_window: unknown field; known fields: context_window_size, prefill_chunk_size"),
    ("context_window_size: 2048", "context_window_size: -5", ":8: overrides.context_window_size: Input should be greater than 0 (got -5)"),
    ("prefill_chunk_size: 1024", "prefill_chunk_size: lots", ":9: overrides.prefill_chunk_size: Input should be a valid integer"),
    ("source: HF://org/model\n", "", ":1: source: required field is missing"),
    ("name: toy", "name: 'bad name!'", ":1: name: String should match pattern"),
    ("quantization: [q0f16, q4f16_1]", "quantization: []", ":5: quantization: List should have at least 1 item"),
    ("devices: [cpu, cuda:sm_80]", "devices: [cpu, cpu]", ":6: devices[1]: 'cpu' is listed twice"),
    ("overrides:\n", "overrides:\n  tensor_parallel_shards: [2, 2]\n",
     ":8: overrides.tensor_parallel_shards: a shard count is listed twice"),
    ("devices: [cpu, cuda:sm_80]", "devices: [cpu, cuda:sm_80", ":7: invalid YAML"),
    ("overrides:\n  context_window_size: 2048\n  prefill_chunk_size: 1024\n", "overrides: 12\n",
     ":7: overrides: Input should be a valid dictionary or instance of Overrides"),
    ("output: dist/toy\n", "kernels:\n  cuda_decode_attention: maybe\noutput: dist/toy\n",
     ":11: kernels.cuda_decode_attention: Input should be a valid boolean (got 'maybe')"),
    ("output: dist/toy\n", "kernels:\n  cuda_dp4a: true\noutput: dist/toy\n",
     ":11: kernels.cuda_dp4a: unknown field; known fields: cuda_integer_dot_batch1, cuda_decode_attention"),
    ("output: dist/toy\n", "generation:\n  temperature: 0.2\n  top_p: 1.5\noutput: dist/toy\n",
     ":12: generation.top_p: Input should be less than or equal to 1 (got 1.5)"),
    ("output: dist/toy\n", "generation:\n  temperature: -1\noutput: dist/toy\n",
     ":11: generation.temperature: Input should be greater than or equal to 0 (got -1)"),
    ("output: dist/toy\n", "generation:\n  max_tokens: 0\noutput: dist/toy\n",
     ":11: generation.max_tokens: Input should be greater than 0 (got 0)"),
    ("output: dist/toy\n", "generation:\n  temp: 0.2\noutput: dist/toy\n",
     ":11: generation.temp: unknown field; known fields: temperature, top_p, top_k, repetition_penalty, max_tokens"),
]


@pytest.mark.parametrize("old,new,expected", CASES, ids=[c[2].split(":")[2].strip() or c[2] for c in CASES])
def test_malformed_recipe_error_names_file_line_and_field(tmp_path, old, new, expected):
    assert old in GOOD
    path = tmp_path / "x.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path) + ":"), message
    assert expected in message, message


def test_good_recipe_loads_with_single_quantization_and_defaults(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: toy\nsource: ./model\nquantization: q4f16_1\n")
    loaded = load_recipe(path)
    assert loaded.recipe.quantization == ["q4f16_1"]
    assert loaded.recipe.devices == ["cpu"]
    assert loaded.output_dir == (tmp_path / "dist" / "toy").resolve()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_prints_recipe_error_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from mlcbuild.cli import app

    path = tmp_path / "x.yaml"
    path.write_text(GOOD.replace("q4f16_1]", "q9]"))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    assert f"{path}:5: quantization[1]: 'q9' is not a known quantization" in result.output
