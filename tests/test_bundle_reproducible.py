"""Two clean builds of one recipe, in two empty caches, give byte-identical bundles; the bundle
verifies against its manifest, a tampered one does not, and its tar is reproducible too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """\
name: repro
source: src
quantization: q4f16_1
devices: [cpu]
overrides:
  context_window_size: 128
  prefill_chunk_size: 32
"""


def mlcbuild(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCBUILD_")}
    env["MLCBUILD_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "mlcbuild.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from compiler_harness import make_checkpoint

    bundles = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(name)
        make_checkpoint("llama", root / "src")
        (root / "repro.yaml").write_text(RECIPE)
        done = mlcbuild("run", "repro.yaml", cache=root / "cache", cwd=root)
        assert done.returncode == 0, done.stdout + done.stderr
        bundles.append(root / "dist" / "repro" / "q4f16_1-cpu")
    return bundles[0], bundles[1]


def test_two_clean_builds_are_byte_identical(two_builds):
    first, second = two_builds
    a, b = tree(first), tree(second)
    assert sorted(a) == sorted(b)
    assert {"manifest.json", "mlc-chat-config.json", "lib/model.so", "params/tensor-cache.json"} <= set(a)
    different = [name for name in a if a[name] != b[name]]
    assert different == []


def test_manifest_names_recipe_keys_files_and_tools(two_builds):
    bundle = two_builds[0]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"] == "q4f16_1" and manifest["device"] == "cpu"
    assert manifest["recipe"]["overrides"] == {"context_window_size": 128, "prefill_chunk_size": 32}
    assert set(manifest["node_keys"]) == {"download", "gen_config[q4f16_1]", "convert_weight[q4f16_1]",
                                          "compile[q4f16_1,cpu]"}
    assert {"tvm", "python", "mlcbuild"} <= set(manifest["tools"])
    listed = {f["path"] for f in manifest["files"]}
    assert listed == set(tree(bundle)) - {"manifest.json"}


def test_verify_accepts_the_bundle_and_names_a_tampered_file(two_builds, tmp_path):
    bundle = two_builds[0]
    ok = mlcbuild("verify", str(bundle), cache=tmp_path / "c", cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout
    copy = tmp_path / "copy"
    for rel, data in tree(bundle).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    config = copy / "mlc-chat-config.json"
    config.write_bytes(config.read_bytes().replace(b"128", b"256", 1))
    (copy / "stray.txt").write_text("not in the manifest")
    bad = mlcbuild("verify", str(copy), cache=tmp_path / "c", cwd=tmp_path)
    assert bad.returncode == 1
    assert "mlc-chat-config.json: content differs from the manifest's digest" in bad.stdout
    assert "stray.txt: not in the manifest" in bad.stdout


def test_pack_gives_the_same_tar_for_both_builds(two_builds, tmp_path):
    tars = []
    for index, bundle in enumerate(two_builds):
        dest = tmp_path / f"{index}.tar.gz"
        done = mlcbuild("pack", str(bundle), "-o", str(dest), cache=tmp_path / "c", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        tars.append(dest.read_bytes())
    assert tars[0] == tars[1]
