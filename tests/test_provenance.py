"""Release provenance: `mlcbuild pack` writes a reproducible tarball and an in-toto / SLSA
statement beside it, signed with Ed25519 on request; `mlcbuild verify` checks a tarball or a
bundle directory against the manifest and the signed statement, and names whatever was altered.

The bundle is made by the real package stage from small hand-made inputs (compiling a model would
add minutes and nothing this file tests); the CLI runs as a user runs it, in a subprocess."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mlcbuild.pipeline.stage import StageContext
from mlcbuild.recipe import load_recipe
from mlcbuild.stages.package import Package

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RECIPE = "name: tiny\nsource: HF://org/tiny\nquantization: q4f16_1\ndevices: [cpu]\n"
LINEAGE = {"download": "a" * 32, "gen_config[q4f16_1]": "b" * 32, "convert_weight[q4f16_1]": "c" * 32,
           "compile[q4f16_1,cpu]": "d" * 32}


def mlcbuild(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCBUILD_")}
    env["MLCBUILD_CACHE_DIR"] = str(cwd / "cache")
    return subprocess.run([sys.executable, "-m", "mlcbuild.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def statement_of(envelope_file: Path) -> dict:
    envelope = json.loads(envelope_file.read_text())
    return json.loads(base64.b64decode(envelope["payload"]))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle directory dist/q4f16_1-cpu written by the package stage, beside the recipe and
    lock it names; the recipe's directory is returned."""
    root = tmp_path_factory.mktemp("provenance")
    (root / "tiny.yaml").write_text(RECIPE)
    (root / "tiny.lock").write_text('{"stands for": "the lock of HF://org/tiny"}\n')
    files = {
        "config/mlc-chat-config.json": b'{"model_type": "llama", "quantization": "q4f16_1"}\n',
        "config/tokenizer.json": b'{"model": {"vocab": {"a": 0}}}\n',
        "weights/params/tensor-cache.json": b'{"tensors": []}\n',
        "weights/params/params_shard_0.bin": bytes(range(256)) * 64,
        "library/lib/model.so": b"\x7fELF" + bytes(4096),
        "source/mlcbuild-source.json": json.dumps({"format": "huggingface", "source": "HF://org/tiny",
                                                   "commit": COMMIT}).encode(),
    }
    for rel, data in files.items():
        (root / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / rel).write_bytes(data)
    os.chmod(root / "in/library/lib/model.so", 0o755)
    stage = Package()
    params = Package.params_for(load_recipe(root / "tiny.yaml"), {"quantization": "q4f16_1", "device": "cpu"})
    out = root / "dist" / "q4f16_1-cpu"
    out.mkdir(parents=True)
    (root / "work").mkdir()
    stage.run(StageContext(params=params, inputs={name: root / "in" / name for name in ("config", "weights", "library", "source")},
                           out=out, work=root / "work", toolchain=stage.toolchain(params), key="e" * 32, lineage=LINEAGE))
    done = mlcbuild("keygen", str(root / "release.key"), cwd=root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    """A private copy of the bundle, the recipe and the key, for a test that packs or tampers."""
    for name in ("dist", "tiny.yaml", "tiny.lock", "release.key", "release.key.pub"):
        source = built / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp_path / name)
    return tmp_path


@pytest.fixture
def packed(copy: Path) -> Path:
    done = mlcbuild("pack", "dist/q4f16_1-cpu", "--sign-key", "release.key", cwd=copy)
    assert done.returncode == 0, done.stderr
    assert "signed, keyid" in done.stdout
    return copy


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the manifest ---------------------------------------------------------------------------


def test_manifest_records_each_files_sha256_and_the_recipe_and_lock(built: Path):
    bundle = built / "dist" / "q4f16_1-cpu"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        rel: sha256(bundle / rel)
        for rel in ("lib/model.so", "mlc-chat-config.json", "params/params_shard_0.bin",
                    "params/tensor-cache.json", "tokenizer.json")}
    assert all(len(f["digest"]) == 32 for f in manifest["files"])  # the xxh3 column stays
    assert manifest["recipe_files"] == [{"name": "tiny.yaml", "sha256": sha256(built / "tiny.yaml")},
                                        {"name": "tiny.lock", "sha256": sha256(built / "tiny.lock")}]
    assert manifest["tools"]["host_cpu"]  # "cpu" compiles for this host: the CPU is in the key


def test_a_local_source_has_no_lock_among_its_recipe_files(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "local.yaml").write_text(RECIPE.replace("HF://org/tiny", "src"))
    (tmp_path / "local.lock").write_text("left over from a Hub source\n")
    params = Package.params_for(load_recipe(tmp_path / "local.yaml"), {"quantization": "q4f16_1", "device": "cpu"})
    assert [(f.name, f.sha256) for f in params.recipe_files] == [("local.yaml", sha256(tmp_path / "local.yaml"))]


def test_verify_names_a_file_whose_sha256_is_not_in_an_old_manifest(copy: Path):
    manifest_file = copy / "dist/q4f16_1-cpu/manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["files"][0]["sha256"]
    manifest_file.write_text(json.dumps(manifest))
    done = mlcbuild("verify", "dist/q4f16_1-cpu", cwd=copy)
    assert done.returncode == 1
    assert "dist/q4f16_1-cpu/lib/model.so: the manifest records no sha256" in done.stdout


# --- keys -----------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(built: Path, tmp_path: Path):
    from cryptography.hazmat.primitives import serialization

    key = built / "release.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    public = serialization.load_pem_public_key((built / "release.key.pub").read_bytes())
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
    again = mlcbuild("keygen", str(key), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    assert key.read_bytes() == private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption())


# --- pack, sign, verify ---------------------------------------------------------------------


def test_pack_writes_a_signed_slsa_statement_and_verify_accepts_tarball_and_directory(packed: Path):
    tarball = packed / "dist/q4f16_1-cpu.tar.gz"
    envelope_file = packed / "dist/q4f16_1-cpu.tar.gz.intoto.jsonl"
    assert envelope_file.read_text().count("\n") == 1
    envelope = json.loads(envelope_file.read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    keyid = hashlib.sha256(_raw_public(packed / "release.key.pub")).hexdigest()
    assert [s["keyid"] for s in envelope["signatures"]] == [keyid]

    statement = statement_of(envelope_file)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    bundle = packed / "dist/q4f16_1-cpu"
    expected = {"q4f16_1-cpu.tar.gz": sha256(tarball)}
    expected.update({f"q4f16_1-cpu/{p.relative_to(bundle).as_posix()}": sha256(p) for p in bundle.rglob("*") if p.is_file()})
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == expected
    build = statement["predicate"]["buildDefinition"]
    assert build["externalParameters"]["source"] == "HF://org/tiny"
    assert build["externalParameters"]["quantization"] == "q4f16_1"
    materials = build["resolvedDependencies"]
    assert {"uri": "HF://org/tiny", "digest": {"gitCommit": COMMIT}, "annotations": {"format": "huggingface"}} in materials
    assert {"name": "tiny.yaml", "digest": {"sha256": sha256(packed / "tiny.yaml")}} in materials
    assert {"name": "tiny.lock", "digest": {"sha256": sha256(packed / "tiny.lock")}} in materials
    assert {m["name"][len("node:"):]: m["digest"]["mlcbuildNodeKey"] for m in materials
            if m.get("name", "").startswith("node:")} == LINEAGE
    builder = statement["predicate"]["runDetails"]["builder"]
    assert {"mlcbuild", "tvm", "python", "host_cpu"} <= set(builder["version"])

    for target in ("dist/q4f16_1-cpu.tar.gz", "dist/q4f16_1-cpu"):
        done = mlcbuild("verify", "--pubkey", "release.key.pub", target, cwd=packed)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "OK" in done.stdout and "signed by release.key.pub" in done.stdout


def test_two_packs_give_byte_identical_tarballs_and_statements(packed: Path):
    (packed / "again").mkdir()
    done = mlcbuild("pack", "dist/q4f16_1-cpu", "--sign-key", "release.key", "-o", "again/q4f16_1-cpu.tar.gz", cwd=packed)
    assert done.returncode == 0, done.stderr
    for name in ("q4f16_1-cpu.tar.gz", "q4f16_1-cpu.tar.gz.intoto.jsonl"):
        assert (packed / "again" / name).read_bytes() == (packed / "dist" / name).read_bytes(), name


def test_a_statement_made_with_an_openssl_key_verifies_with_openssl_too(copy: Path):
    """openssl writes the keys and checks the signature itself, over DSSE's encoding spelled out here."""
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", "ossl.pem"], cwd=copy, check=True)
    subprocess.run(["openssl", "pkey", "-in", "ossl.pem", "-pubout", "-out", "ossl.pub"], cwd=copy, check=True)
    done = mlcbuild("pack", "dist/q4f16_1-cpu", "--sign-key", "ossl.pem", cwd=copy)
    assert done.returncode == 0, done.stderr
    done = mlcbuild("verify", "--pubkey", "ossl.pub", "dist/q4f16_1-cpu.tar.gz", cwd=copy)
    assert done.returncode == 0, done.stdout + done.stderr

    envelope = json.loads((copy / "dist/q4f16_1-cpu.tar.gz.intoto.jsonl").read_text())
    payload = base64.b64decode(envelope["payload"])
    kind = b"application/vnd.in-toto+json"
    (copy / "signed").write_bytes(b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload))
    (copy / "sig").write_bytes(base64.b64decode(envelope["signatures"][0]["sig"]))
    checked = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "ossl.pub", "-rawin",
                              "-in", "signed", "-sigfile", "sig"], cwd=copy, capture_output=True, text=True)
    assert checked.returncode == 0 and "Signature Verified Successfully" in checked.stdout, checked.stdout + checked.stderr


# --- tampering ------------------------------------------------------------------------------


def test_a_tampered_bundle_file_fails_naming_it(packed: Path):
    flip_byte(packed / "dist/q4f16_1-cpu/params/params_shard_0.bin")
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "dist/q4f16_1-cpu", cwd=packed)
    assert done.returncode == 1
    assert "dist/q4f16_1-cpu/params/params_shard_0.bin: content differs from the manifest's digest" in done.stdout


def test_a_file_rewritten_with_its_manifest_passes_the_manifest_but_not_the_signed_statement(packed: Path):
    bundle = packed / "dist/q4f16_1-cpu"
    flip_byte(bundle / "tokenizer.json", 2)
    manifest = json.loads((bundle / "manifest.json").read_text())
    from mlcbuild.cache.digests import file_digests

    for entry in manifest["files"]:
        if entry["path"] == "tokenizer.json":
            entry["digest"], entry["sha256"] = file_digests(bundle / "tokenizer.json")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert mlcbuild("verify", "dist/q4f16_1-cpu", cwd=packed).returncode == 0  # consistent, so unsigned check passes
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "dist/q4f16_1-cpu", cwd=packed)
    assert done.returncode == 1
    assert "dist/q4f16_1-cpu/tokenizer.json: sha256" in done.stdout
    assert "dist/q4f16_1-cpu/manifest.json: sha256" in done.stdout


def test_a_tampered_tarball_byte_fails_naming_the_tarball(packed: Path):
    flip_byte(packed / "dist/q4f16_1-cpu.tar.gz")
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "dist/q4f16_1-cpu.tar.gz", cwd=packed)
    assert done.returncode == 1
    assert "dist/q4f16_1-cpu.tar.gz: sha256" in done.stdout and "matches no tarball of the statement" in done.stdout


@pytest.mark.parametrize("part", ["payload", "signature"])
def test_a_tampered_statement_or_signature_fails_naming_the_statement(packed: Path, part: str):
    path = packed / "dist/q4f16_1-cpu.tar.gz.intoto.jsonl"
    envelope = json.loads(path.read_text())
    if part == "payload":
        payload = bytearray(base64.b64decode(envelope["payload"]))
        payload[payload.index(b"q4f16_1-cpu/lib/model.so") + 2] ^= 0x01
        envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    else:
        sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        sig[10] ^= 0x01
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(envelope) + "\n")
    for target in ("dist/q4f16_1-cpu.tar.gz", "dist/q4f16_1-cpu"):
        done = mlcbuild("verify", "--pubkey", "release.key.pub", target, cwd=packed)
        assert done.returncode == 1
        assert "dist/q4f16_1-cpu.tar.gz.intoto.jsonl: the signature does not verify with release.key.pub" in done.stdout


def test_wrong_key_unsigned_and_missing_statements_are_refused(packed: Path):
    assert mlcbuild("keygen", "other.key", cwd=packed).returncode == 0
    done = mlcbuild("verify", "--pubkey", "other.key.pub", "dist/q4f16_1-cpu.tar.gz", cwd=packed)
    assert done.returncode == 1 and "q4f16_1-cpu.tar.gz.intoto.jsonl: not signed by other.key.pub" in done.stdout

    assert mlcbuild("pack", "dist/q4f16_1-cpu", "-o", "unsigned.tar.gz", cwd=packed).returncode == 0
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "unsigned.tar.gz", cwd=packed)
    assert done.returncode == 1 and "unsigned.tar.gz.intoto.jsonl: the statement is unsigned" in done.stdout
    done = mlcbuild("verify", "unsigned.tar.gz", cwd=packed)  # no key asked for: the digests are still checked
    assert done.returncode == 0 and "signature not checked" in done.stdout

    (packed / "unsigned.tar.gz.intoto.jsonl").unlink()
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "unsigned.tar.gz", cwd=packed)
    assert done.returncode == 1 and "unsigned.tar.gz.intoto.jsonl: no provenance statement" in done.stdout
    done = mlcbuild("verify", "--pubkey", "release.key.pub", "--provenance", "dist/q4f16_1-cpu.tar.gz.intoto.jsonl",
                    "unsigned.tar.gz", cwd=packed)
    assert done.returncode == 0, done.stdout  # the same bytes as the signed tarball, under another name


# --- hostile tarballs -----------------------------------------------------------------------


def test_links_absolute_paths_and_dotdot_members_are_refused_and_nothing_is_extracted(packed: Path):
    bundle = packed / "dist/q4f16_1-cpu"
    hostile = packed / "hostile.tar.gz"
    with tarfile.open(hostile, "w:gz") as tar:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            tar.add(path, f"q4f16_1-cpu/{path.relative_to(bundle).as_posix()}")
        for name in ("../escaped.txt", "/tmp/absolute.txt", "q4f16_1-cpu/../../escaped2.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("q4f16_1-cpu/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    before = sorted(p.name for p in packed.parent.iterdir())
    done = mlcbuild("verify", "hostile.tar.gz", cwd=packed)
    assert done.returncode == 1
    for name in ("../escaped.txt", "/tmp/absolute.txt", "q4f16_1-cpu/../../escaped2.txt"):
        assert f"hostile.tar.gz member {name}: an absolute path or '..': refused" in done.stdout
    assert "hostile.tar.gz member q4f16_1-cpu/link: a link" in done.stdout
    assert sorted(p.name for p in packed.parent.iterdir()) == before
    assert not (packed / "escaped.txt").exists() and not Path("/tmp/absolute.txt").exists()


def _raw_public(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(path.read_bytes()).public_bytes_raw()
