"""Release provenance: what `mlcbuild pack` writes beside a bundle's tarball, and what
`mlcbuild verify` checks a tarball or a bundle directory against.

The statement is an in-toto Statement v1 whose predicate is SLSA provenance v1:

- subject: the tarball, and every file of the bundle as ``<bundle dir name>/<path>`` (the names
  its tar members have), each by sha256, so an unpacked bundle can be checked against it too;
- buildDefinition: the recipe fields as external parameters; as resolved dependencies the
  weights' source (URI, commit), the recipe and lock files (sha256) and every node key;
- runDetails.builder: mlcbuild, tvm, python, nvcc versions and the host CPU where it entered a key.

It is wrapped in a DSSE envelope (one JSON line in ``<tarball>.intoto.jsonl``), signed with
Ed25519 over DSSE's pre-authentication encoding when a key is given. Nothing in it depends on the
time or the machine beyond what the manifest records, and Ed25519 signatures are deterministic,
so two packs of one bundle give byte-identical tarballs and statements.

Build side only: the runtime never imports this module.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from mlcbuild.atomicfile import write_atomic
from mlcbuild.bundle_format import MANIFEST_FILE, Manifest, read_manifest, verify_bundle
from mlcbuild.cache.digests import CHUNK, canonical_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# What this provenance describes: a bundle built from a recipe by mlcbuild's DAG (v1 of its layout).
BUILD_TYPE = "urn:mlcbuild:buildtype:bundle:v1"
BUILDER_ID = "urn:mlcbuild:builder"
STATEMENT_SUFFIX = ".intoto.jsonl"
# manifest.json is read into memory from a tarball; a real one is a few hundred KB.
_MAX_MANIFEST_BYTES = 64 << 20


class ProvenanceError(Exception):
    """A key or statement that cannot be used; the message names the file and what to do."""


# --- schemas (in-toto Statement v1, SLSA provenance v1, DSSE) ----------------------------------


class _Spec(BaseModel):
    """Fields as the specs spell them (camelCase) in JSON, snake_case in Python; unknown fields
    of a statement made by another tool are kept, not refused."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True, extra="allow")


class ResourceDescriptor(_Spec):
    name: str | None = None
    uri: str | None = None
    digest: dict[str, str] = {}
    annotations: dict[str, Any] | None = None


class Builder(_Spec):
    id: str
    version: dict[str, str] = {}


class RunDetails(_Spec):
    builder: Builder


class BuildDefinition(_Spec):
    build_type: str
    external_parameters: dict[str, Any]
    resolved_dependencies: list[ResourceDescriptor] = []


class Provenance(_Spec):
    build_definition: BuildDefinition
    run_details: RunDetails


class Statement(_Spec):
    type: Literal["https://in-toto.io/Statement/v1"] = Field(STATEMENT_TYPE, alias="_type")
    subject: list[ResourceDescriptor]
    predicate_type: Literal["https://slsa.dev/provenance/v1"] = PREDICATE_TYPE
    predicate: Provenance

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no whitespace): the same statement, the same bytes."""
        return canonical_bytes(self.model_dump(mode="json", by_alias=True, exclude_none=True))


class Signature(_Spec):
    keyid: str = ""
    sig: str


class Envelope(_Spec):
    payload_type: str
    payload: str  # base64 of the statement's bytes
    signatures: list[Signature] = []


# --- the statement ---------------------------------------------------------------------------


def build_statement(bundle: Path, manifest: Manifest, tarball_name: str, tarball_sha256: str) -> Statement:
    """The provenance of ``bundle`` (already verified against ``manifest``, whose sha256 of each
    file it takes) packed as ``tarball_name``."""
    top = Path(bundle).name
    files = {f"{top}/{f.path}": f.sha256 for f in manifest.files}
    files[f"{top}/{MANIFEST_FILE}"] = _sha256_file(Path(bundle) / MANIFEST_FILE)
    subject = [ResourceDescriptor(name=tarball_name, digest={"sha256": tarball_sha256})]
    subject += [ResourceDescriptor(name=name, digest={"sha256": files[name]}) for name in sorted(files)]
    return Statement(
        subject=subject,
        predicate=Provenance(
            build_definition=BuildDefinition(
                build_type=BUILD_TYPE,
                external_parameters=manifest.recipe,
                resolved_dependencies=_materials(manifest),
            ),
            run_details=RunDetails(builder=Builder(id=BUILDER_ID, version=dict(sorted(manifest.tools.items())))),
        ),
    )


def _materials(manifest: Manifest) -> list[ResourceDescriptor]:
    found = []
    source = dict(manifest.source)
    if "source" in source:
        where = str(source.pop("source"))
        commit = source.pop("commit", None)
        found.append(ResourceDescriptor(
            # a local checkout or file is recorded by its name only (its content is in the keys)
            uri=where if "://" in where else f"file:{where}",
            digest={"gitCommit": commit} if commit else {},
            annotations=source or None,
        ))
    found += [ResourceDescriptor(name=f.name, digest={"sha256": f.sha256}) for f in manifest.recipe_files]
    # A node key covers a stage's params, its inputs' content and its toolchain: with the cache
    # it names the exact artifact each step produced.
    found += [ResourceDescriptor(name=f"node:{label}", digest={"mlcbuildNodeKey": key})
              for label, key in sorted(manifest.node_keys.items())]
    return found


# --- DSSE envelope and Ed25519 keys ---------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers (type and body, with
    their lengths, so neither can be shifted into the other)."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def envelope_line(statement: Statement, key: Ed25519PrivateKey | None = None) -> bytes:
    """The DSSE envelope of ``statement`` as one JSON line (signed when ``key`` is given)."""
    payload = statement.to_bytes()
    signatures = []
    if key is not None:
        sig = key.sign(pae(PAYLOAD_TYPE, payload))
        signatures.append(Signature(keyid=key_id(key.public_key()), sig=base64.b64encode(sig).decode()))
    envelope = Envelope(payload_type=PAYLOAD_TYPE, payload=base64.b64encode(payload).decode(), signatures=signatures)
    return canonical_bytes(envelope.model_dump(mode="json", by_alias=True)) + b"\n"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key in PEM (PKCS8: `mlcbuild keygen`, `openssl genpkey
    -algorithm ed25519`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise ProvenanceError(f"{path}: the key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvenanceError(f"{path}: not a PEM private key ({exc}); make one with `mlcbuild keygen PATH`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvenanceError(f"{path}: not an Ed25519 key ({type(key).__name__}); signing takes an Ed25519 key "
                              "(`mlcbuild keygen PATH`)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key in PEM (SubjectPublicKeyInfo: `mlcbuild keygen` writes PATH.pub)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvenanceError(f"{path}: not a PEM public key ({exc}); give the .pub file `mlcbuild keygen` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProvenanceError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProvenanceError(f"{path}: cannot read the key ({exc.strerror})") from None


def generate_key_pair(path: Path) -> str:
    """Write a new Ed25519 key: ``path`` (PKCS8 PEM, mode 0600) and ``path.pub`` (PEM
    SubjectPublicKeyInfo). Never overwrites either. Returns the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists() or existing.is_symlink():
            raise ProvenanceError(f"{existing} exists; keygen never overwrites a key (remove it or pick another PATH)")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(path, private, 0o600)
    _write_new(public_path, public, 0o644)
    return key_id(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` complete or not at all, and only if it does not exist (link, not rename:
    a rename would replace a file made meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed or (for 0600) cannot widen it
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ProvenanceError(f"{path} exists; keygen never overwrites a key") from None
    finally:
        tmp.unlink(missing_ok=True)


# --- pack ------------------------------------------------------------------------------------


def statement_path(tarball: Path) -> Path:
    """Where the statement of a tarball lives: beside it, ``<tarball>.intoto.jsonl``."""
    return tarball.with_name(tarball.name + STATEMENT_SUFFIX)


def pack_bundle(bundle: Path, dest: Path, key: Ed25519PrivateKey | None = None) -> tuple[Path, Path]:
    """Verify ``bundle`` against its manifest, write its reproducible tarball ``dest`` and the
    provenance statement beside it (signed with ``key`` when given). Returns (tarball, statement)."""
    from mlcbuild.stages.package import write_bundle_tar

    bundle, dest = Path(bundle), Path(dest)
    manifest = read_manifest(bundle)
    problems = verify_bundle(bundle, manifest)
    if problems:
        raise ProvenanceError(f"{bundle} does not match its manifest ({problems[0]}); rebuild it first")
    statement_file = statement_path(dest)
    # A statement left from an earlier pack must not sit beside the new tarball, even for a moment.
    statement_file.unlink(missing_ok=True)
    write_bundle_tar(bundle, dest)
    statement = build_statement(bundle, manifest, dest.name, _sha256_file(dest))
    write_atomic(statement_file, envelope_line(statement, key))
    return dest, statement_file


# --- verify ----------------------------------------------------------------------------------


@dataclass
class Verification:
    """What `verify` found: ``problems`` (each naming a file; empty when all is intact) and
    what was checked, for the report."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def verify(target: Path, pubkey: Path | None = None, provenance: Path | None = None) -> Verification:
    """Check a bundle directory or a bundle tarball.

    A tarball: its statement's signature (with ``pubkey``), its sha256 against the statement,
    then every member, streamed (never extracted), against the manifest inside it and against
    the statement. The statement (default ``<tarball>.intoto.jsonl``) is required with
    ``pubkey`` or ``provenance``, and checked when present otherwise.
    A directory: every file against its manifest; with ``pubkey`` or ``provenance`` also every
    file against the statement (default ``<bundle>.tar.gz.intoto.jsonl`` beside it).
    Raises ProvenanceError for an unusable key file or target.
    """
    target = Path(target)
    public_key = load_public_key(pubkey) if pubkey is not None else None
    if target.is_dir():
        statement_file = provenance or statement_path(target.with_name(target.name + ".tar.gz"))
    elif target.is_file():
        statement_file = provenance or statement_path(target)
    else:
        raise ProvenanceError(f"{target}: no such bundle directory or tarball")
    asked = pubkey is not None or provenance is not None
    result = Verification()
    statement = None
    if statement_file.is_file() and (asked or not target.is_dir()):
        statement = _read_statement(statement_file, public_key, pubkey, result)
    elif asked:
        result.problems.append(f"{statement_file}: no provenance statement (`mlcbuild pack` writes it beside "
                               "the tarball; name another with --provenance)")
    elif not target.is_dir():
        result.checked.append(f"no statement ({statement_file.name}) beside it: only the manifest inside")
    if target.is_dir():
        _verify_directory(target, statement, statement_file, result)
    else:
        _verify_tarball(target, statement, statement_file, result)
    return result


def _read_statement(path: Path, public_key: Ed25519PublicKey | None, pubkey: Path | None,
                    result: Verification) -> Statement | None:
    """The statement in the envelope at ``path``, its signature checked when a key is given;
    None (with the problem recorded) when it cannot be trusted or read."""
    from cryptography.exceptions import InvalidSignature

    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    if len(lines) != 1:
        result.problems.append(f"{path}: expected one DSSE envelope (one JSON line), found {len(lines)} lines")
        return None
    try:
        envelope = Envelope.model_validate_json(lines[0])
        payload = base64.b64decode(envelope.payload, validate=True)
    except (ValidationError, ValueError) as exc:
        result.problems.append(f"{path}: not a DSSE envelope ({_first_error(exc)})")
        return None
    if envelope.payload_type != PAYLOAD_TYPE:
        result.problems.append(f"{path}: payloadType {envelope.payload_type!r}, expected {PAYLOAD_TYPE!r}")
        return None
    if public_key is not None:
        wanted = key_id(public_key)
        if not envelope.signatures:
            result.problems.append(f"{path}: the statement is unsigned; {pubkey} cannot vouch for it "
                                   "(pack with --sign-key, or verify without --pubkey)")
            return None
        signed = pae(envelope.payload_type, payload)
        good = False
        for signature in envelope.signatures:
            try:
                public_key.verify(base64.b64decode(signature.sig, validate=True), signed)
                good = True
                break
            except (InvalidSignature, ValueError):
                continue
        if not good:
            if all(s.keyid != wanted for s in envelope.signatures):
                ids = ", ".join(s.keyid or "(none)" for s in envelope.signatures)
                result.problems.append(f"{path}: not signed by {pubkey} (keyid {wanted}); signed by keyid {ids}")
            else:
                result.problems.append(f"{path}: the signature does not verify with {pubkey}: "
                                       "the statement or its signature was altered")
            return None
        result.checked.append(f"signed by {pubkey} (keyid {wanted[:16]})")
    try:
        statement = Statement.model_validate_json(payload)
    except ValidationError as exc:
        result.problems.append(f"{path}: not an in-toto Statement v1 with SLSA provenance v1 ({_first_error(exc)})")
        return None
    if public_key is None:
        result.checked.append("signature not checked (no --pubkey)")
    return statement


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or '(top level)'}: {first['msg']}"
    return str(exc)


def _split_subjects(statement: Statement) -> tuple[dict[str, str], dict[str, str]]:
    """({archive name: sha256}, {member path inside the bundle: sha256}) of the subjects."""
    archives, members = {}, {}
    for subject in statement.subject:
        name, sha256 = subject.name or "", subject.digest.get("sha256", "")
        top, sep, rel = name.partition("/")
        (members if sep else archives)[rel if sep else name] = sha256
    return archives, members


def _compare_with_statement(files: dict[str, str], statement: Statement, statement_file: Path, where: str,
                            result: Verification, complete: bool = True) -> None:
    """Every file (bundle-relative path -> sha256) against the statement's file subjects
    (``complete``: ``files`` is all there is, so a subject not among them is missing)."""
    _, subjects = _split_subjects(statement)
    for rel in sorted(set(files) | set(subjects)):
        if rel not in subjects:
            result.problems.append(f"{where}{rel}: not in the statement {statement_file}")
        elif rel not in files:
            if complete:
                result.problems.append(f"{where}{rel}: missing (the statement {statement_file} lists it)")
        elif files[rel] != subjects[rel]:
            result.problems.append(f"{where}{rel}: sha256 {files[rel]} differs from the statement "
                                   f"{statement_file} ({subjects[rel]})")
    result.checked.append(f"{len(files)} files match {statement_file.name}")


def _verify_directory(bundle: Path, statement: Statement | None, statement_file: Path, result: Verification) -> None:
    try:
        manifest = read_manifest(bundle)
    except (FileNotFoundError, ValueError) as exc:
        result.problems.append(str(exc))
        return
    result.problems += [f"{bundle}/{problem}" for problem in verify_bundle(bundle, manifest)]
    result.checked.insert(0, f"{len(manifest.files)} files match {MANIFEST_FILE}")
    if statement is not None:
        # verify_bundle compared each file's sha256 with the manifest's (one read per file), so
        # the manifest's values stand for the files here; manifest.json itself is hashed now.
        # (A file on disk that the manifest does not list is reported above.)
        files = {f.path: f.sha256 or "" for f in manifest.files}
        files[MANIFEST_FILE] = _sha256_file(bundle / MANIFEST_FILE)
        _compare_with_statement(files, statement, statement_file, f"{bundle}/", result)


class _HashingReader(io.RawIOBase):
    """Reads a file and hashes every byte read, so the tarball's sha256 comes from the same
    pass that streams its members."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return self.sha256.hexdigest()


@dataclass
class _Member:
    size: int
    xxh3: str
    sha256: str


def _verify_tarball(tarball: Path, statement: Statement | None, statement_file: Path, result: Verification) -> None:
    members: dict[str, _Member] = {}
    manifest_bytes: bytes | None = None
    top: str | None = None
    complete = True  # false when the stream broke: what was not read is not "missing"
    where = f"{tarball} member "
    with open(tarball, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                for info in tar:
                    rel, problem = _member_path(info, top)
                    if problem:
                        result.problems.append(f"{where}{info.name}: {problem}")
                        continue
                    top = top or PurePosixPath(info.name).parts[0]
                    if rel in members:
                        result.problems.append(f"{where}{info.name}: appears twice")
                        continue
                    handle = tar.extractfile(info)
                    assert handle is not None  # a regular file, checked above
                    fast, strong = xxhash.xxh3_128(), hashlib.sha256()
                    kept = bytearray() if rel == MANIFEST_FILE and info.size <= _MAX_MANIFEST_BYTES else None
                    while chunk := handle.read(CHUNK):
                        fast.update(chunk)
                        strong.update(chunk)
                        if kept is not None:
                            kept += chunk
                    members[rel] = _Member(info.size, fast.hexdigest(), strong.hexdigest())
                    if kept is not None:
                        manifest_bytes = bytes(kept)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            result.problems.append(f"{tarball}: not a readable .tar.gz ({exc})")
            complete = False
        tarball_sha256 = reader.drain()
    if statement is not None:
        archives, _ = _split_subjects(statement)
        if tarball_sha256 not in archives.values():
            result.problems.append(f"{tarball}: sha256 {tarball_sha256} matches no tarball of the statement "
                                   f"{statement_file} ({', '.join(f'{n}: {d}' for n, d in archives.items())})")
        else:
            result.checked.append(f"its sha256 matches {statement_file.name}")
    prefix = f"{where}{top}/" if top else where
    if manifest_bytes is None:
        if complete:
            result.problems.append(f"{prefix}{MANIFEST_FILE}: missing (or over {_MAX_MANIFEST_BYTES >> 20} MiB)")
    else:
        try:
            manifest = Manifest.model_validate_json(manifest_bytes)
        except ValidationError as exc:
            result.problems.append(f"{prefix}{MANIFEST_FILE}: not a valid manifest ({_first_error(exc)})")
        else:
            _compare_with_manifest(members, manifest, prefix, result, complete)
    if statement is not None:
        _compare_with_statement({rel: m.sha256 for rel, m in members.items()}, statement, statement_file,
                                prefix, result, complete)


def _member_path(info: tarfile.TarInfo, top: str | None) -> tuple[str, str | None]:
    """(path inside the bundle, problem or None) of a tar member: only regular files, under one
    top directory, with no absolute path or '..'."""
    if not info.isreg():
        kind = "a link" if info.issym() or info.islnk() else "a directory" if info.isdir() else "a special file"
        return "", f"{kind}; a bundle tarball holds regular files only"
    path = PurePosixPath(info.name)
    if path.is_absolute() or ".." in path.parts:
        return "", "an absolute path or '..': refused"
    if len(path.parts) < 2:
        return "", "not under the bundle's directory"
    if top is not None and path.parts[0] != top:
        return "", f"outside the bundle's directory {top}/"
    return PurePosixPath(*path.parts[1:]).as_posix(), None


def _compare_with_manifest(members: dict[str, _Member], manifest: Manifest, prefix: str, result: Verification,
                           complete: bool) -> None:
    listed = {f.path: f for f in manifest.files}
    for rel in sorted(set(members) | set(listed)):
        if rel == MANIFEST_FILE:
            continue
        member, entry = members.get(rel), listed.get(rel)
        if entry is None:
            result.problems.append(f"{prefix}{rel}: not in the manifest")
        elif member is None:
            if complete:
                result.problems.append(f"{prefix}{rel}: missing")
        elif member.size != entry.size:
            result.problems.append(f"{prefix}{rel}: size {member.size}, manifest says {entry.size}")
        elif entry.sha256 is None:
            result.problems.append(f"{prefix}{rel}: the manifest records no sha256 (an older mlcbuild made it)")
        elif member.xxh3 != entry.digest or member.sha256 != entry.sha256:
            result.problems.append(f"{prefix}{rel}: content differs from the manifest's digest "
                                   f"(sha256 {member.sha256}, manifest says {entry.sha256})")
    result.checked.insert(0, f"{len(listed)} files match the {MANIFEST_FILE} inside")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
