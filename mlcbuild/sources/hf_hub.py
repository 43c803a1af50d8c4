"""Hugging Face Hub sources through ``huggingface_hub``: resolve a revision to a commit and the
exact files to take (``resolve``), and fetch them verified against the lock (``fetch``).

The Hub's own download cache (``HF_HOME``/``HF_HUB_CACHE``) holds what was downloaded, so other
tools share it and a file is never downloaded twice; mlcbuild's artifact cache then holds the
download node's output. ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` are read when a call is made, not when ``huggingface_hub`` was imported, so
they can change within one process (the tests do this).

``huggingface_hub`` is imported inside the functions: a no-op run reads the lock and never
needs it.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mlcbuild.sources import HubSource, SourceError, has_weights, select_files
from mlcbuild.sources.lock import LockedFile, SourceLock, file_lock_digest

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
DEFAULT_ENDPOINT = "https://huggingface.co"
# Seconds to wait for the Hub's answer when resolving a revision.
RESOLVE_TIMEOUT = 30.0


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    offline: bool


def settings() -> HubSettings:
    """The Hub settings from the environment as it is now."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if os.environ.get("HF_HUB_CACHE"):
        cache_dir = Path(os.environ["HF_HUB_CACHE"])
    else:
        xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = Path(os.environ.get("HF_HOME") or xdg / "huggingface") / "hub"
    offline = any((os.environ.get(var) or "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return HubSettings(endpoint=endpoint, cache_dir=cache_dir.expanduser(), offline=offline)


def _storage(hub: HubSettings, repo_id: str) -> Path:
    """A model's folder in the Hugging Face cache (its documented layout: refs/, blobs/, snapshots/)."""
    return hub.cache_dir / ("models--" + repo_id.replace("/", "--"))


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


# -- resolving ------------------------------------------------------------------------------
def resolve(source: HubSource) -> SourceLock:
    """Ask the Hub which commit ``source.revision`` is now and which files to take from it.

    With ``HF_HUB_OFFLINE=1`` the answer comes from the Hugging Face cache instead (what an
    earlier download left there), or a SourceError says there is nothing to build from.
    """
    hub = settings()
    if hub.offline:
        lock = resolve_from_cache(source, hub)
        if lock is None:
            raise SourceError(
                f"HF_HUB_OFFLINE=1 and {source.uri}@{source.revision} is neither locked nor in the "
                f"Hugging Face cache ({hub.cache_dir}): unset HF_HUB_OFFLINE and run once with network"
            )
        return lock
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint)
    with _hub_errors(source, hub, action="resolve"):
        info = api.model_info(source.repo_id, revision=source.revision, files_metadata=True, timeout=RESOLVE_TIMEOUT)
    if not info.sha or not _COMMIT.match(info.sha):
        raise SourceError(f"{hub.endpoint} gave no commit for {source.uri}@{source.revision}; is HF_ENDPOINT a Hub?")
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = select_files(siblings)
    where = f"{source.uri}@{source.revision} (commit {info.sha[:12]})"
    if "config.json" not in names or not has_weights(names):
        raise SourceError(
            f"{where} has no config.json and *.safetensors/pytorch_model*.bin at its top level, so it is "
            "not a transformers checkpoint; for a GGUF repository download the .gguf file and use its path"
        )
    files = []
    for name in names:
        sibling = siblings[name]
        if sibling.lfs is not None:
            files.append(LockedFile(name=name, size=sibling.lfs.size, digest=f"sha256:{sibling.lfs.sha256}"))
        elif sibling.blob_id and sibling.size is not None:
            files.append(LockedFile(name=name, size=sibling.size, digest=f"gitsha1:{sibling.blob_id}"))
        else:
            raise SourceError(f"{hub.endpoint} gave no size or digest for {name} of {where}")
    if info.gated and not _has_token():
        # Metadata of a gated repo is public, its files are not: say so before downloading.
        raise SourceError(_gated_message(source, hub, has_token=False))
    if info.gated:
        _check_access(source, info.sha, names[0], hub)
    _remember_ref(source, info.sha, hub)
    return SourceLock(source=source.uri, revision=source.revision, commit=info.sha, files=tuple(files))


def _remember_ref(source: HubSource, commit: str, hub: HubSettings) -> None:
    """Record revision -> commit in the Hugging Face cache (``refs/<revision>``, as
    huggingface_hub does when it downloads by branch name): files are fetched by commit, and
    without the ref an offline run with no lock could not find them (``resolve_from_cache``)."""
    if _COMMIT.match(source.revision):
        return
    ref = _storage(hub, source.repo_id) / "refs" / source.revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError:
        pass  # a read-only cache only costs the offline fallback


def _check_access(source: HubSource, commit: str, name: str, hub: HubSettings) -> None:
    """A HEAD on one file: a token without access to a gated repo fails here, at lock time."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    with _hub_errors(source, hub, action="resolve"):
        get_hf_file_metadata(hf_hub_url(source.repo_id, name, revision=commit, endpoint=hub.endpoint))


def resolve_from_cache(source: HubSource, hub: HubSettings | None = None) -> SourceLock | None:
    """Build a lock from what the Hugging Face cache holds for ``source`` (no network, no
    hashing: a cached blob is named by its etag, which is the sha256 of an LFS file or the git
    blob id of a small one). None when the cache lacks the revision or a file it needs."""
    hub = hub or settings()
    storage = _storage(hub, source.repo_id)
    commit = source.revision
    if not _COMMIT.match(commit):
        try:
            commit = (storage / "refs" / source.revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    names = select_files(p.name for p in snapshot.iterdir() if p.is_file())
    if "config.json" not in names or not has_weights(names) or not _shards_complete(snapshot, names):
        return None
    files = []
    for name in names:
        blob = (snapshot / name).resolve()
        etag, size = blob.name, blob.stat().st_size
        if re.fullmatch(r"[0-9a-f]{64}", etag):
            digest = f"sha256:{etag}"
        elif re.fullmatch(r"[0-9a-f]{40}", etag):
            digest = f"gitsha1:{etag}"
        else:  # a cache without symlinks (Windows) keeps copies: hash this one
            digest = file_lock_digest(blob, "sha256:" + "0" * 64)
        files.append(LockedFile(name=name, size=size, digest=digest))
    return SourceLock(source=source.uri, revision=source.revision, commit=commit, files=tuple(files))


def _shards_complete(snapshot: Path, names: list[str]) -> bool:
    """Whether every shard a weight index names is present (an interrupted download leaves
    a snapshot with some shards only, which must not be locked as if it were the model)."""
    import json

    for index in (n for n in names if n.endswith(".index.json")):
        try:
            weight_map = json.loads((snapshot / index).read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return False
        if not set(weight_map.values()) <= set(names):
            return False
    return True


# -- fetching -------------------------------------------------------------------------------
def fetch(
    lock: SourceLock,
    dest: Path,
    *,
    lock_name: str,
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int | None], None] = lambda done, total: None,
) -> None:
    """Put every locked file into ``dest``, verified against its locked size and digest.

    Files come from the Hugging Face cache, downloaded into it first where missing (with
    ``HF_HUB_OFFLINE=1``, only from the cache). A file whose bytes differ from the lock is
    refused: the commit is the same, so the content must be too, and a silent change is exactly
    what the lock exists to catch.
    """
    hub = settings()
    source = HubSource(repo_id=lock.source[len("HF://") :], revision=lock.commit)
    total = sum(f.size for f in lock.files)
    done = 0
    progress(0, total)
    for locked in lock.files:
        cached = _download(source, locked, hub, log, lambda n, base=done: progress(base + n, total))
        _verify_into(cached, dest / locked.name, locked, lock, lock_name)
        done += locked.size
        progress(done, total)


def _download(
    source: HubSource,
    locked: LockedFile,
    hub: HubSettings,
    log: Callable[[str], None],
    on_bytes: Callable[[int], None],
) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import silent_tqdm

    cache_dir = str(hub.cache_dir)
    hit = try_to_load_from_cache(source.repo_id, locked.name, cache_dir=cache_dir, revision=source.revision)
    if isinstance(hit, str):
        return Path(hit)
    if hub.offline:
        raise SourceError(
            f"HF_HUB_OFFLINE=1 and {locked.name} of {source.uri}@{source.revision[:12]} is not in the "
            f"Hugging Face cache ({hub.cache_dir}): unset HF_HUB_OFFLINE to download it"
        )
    log(f"downloading {locked.name} ({_human(locked.size)}) from {hub.endpoint}/{source.repo_id}")
    blobs = _storage(hub, source.repo_id) / "blobs"
    with (
        _hub_errors(source, hub, action="download", name=locked.name),
        _watch_partial(blobs, locked.digest.partition(":")[2], on_bytes),
    ):
        # hf_hub_download resumes a transfer cut mid-file with a Range request (a few retries),
        # and keeps each finished file, so a rerun after an interruption fetches only the rest.
        path = hf_hub_download(
            source.repo_id,
            locked.name,
            revision=source.revision,
            cache_dir=cache_dir,
            endpoint=hub.endpoint,
            tqdm_class=silent_tqdm,  # progress goes through ctx.progress, not a second bar
        )
    return Path(path)


@contextmanager
def _watch_partial(blobs: Path, etag: str, on_bytes: Callable[[int], None]) -> Iterator[None]:
    """Report the growth of the file ``huggingface_hub`` is downloading into (it writes
    ``blobs/<etag>.<random>.incomplete``); polling the file works the same for plain HTTP and
    for Xet transfers, whose progress objects differ."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.25):
            sizes = [p.stat().st_size for p in blobs.glob(f"{etag}*.incomplete") if p.exists()]
            if sizes:
                on_bytes(max(sizes))

    watcher = threading.Thread(target=poll, name="mlcbuild-download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _verify_into(cached: Path, target: Path, locked: LockedFile, lock: SourceLock, lock_name: str) -> None:
    """Check ``cached`` against the lock and place it at ``target`` (a hard link where the file
    systems allow: the Hub cache never rewrites a blob in place, so sharing the inode is safe
    and saves a copy of multi-GB weights)."""
    blob = cached.resolve()
    size = blob.stat().st_size
    actual = file_lock_digest(blob, locked.digest) if size == locked.size else f"{size} bytes"
    if actual != locked.digest:
        _forget(cached, blob, actual)
        expected = locked.digest if size == locked.size else f"{locked.size} bytes"
        raise SourceError(
            f"{locked.name} of {lock.source}@{lock.commit[:12]} does not match {lock_name} "
            f"(expected {expected}, got {actual}): the file changed under the locked commit, so it is "
            f"refused; run `mlcbuild lock --update` on the recipe to accept what the Hub serves now"
        )
    try:
        os.link(blob, target)
    except OSError:
        import shutil

        shutil.copyfile(blob, target)


def _forget(pointer: Path, blob: Path, actual: str) -> None:
    """Drop a refused file from the Hugging Face cache so that a rerun asks the Hub again
    instead of refusing the same stale copy forever; the blob goes too when its bytes do not
    even match its own name (a corrupt transfer)."""
    pointer.unlink(missing_ok=True)
    if not actual.endswith(blob.name):
        blob.unlink(missing_ok=True)


@contextmanager
def _hub_errors(source: HubSource, hub: HubSettings, action: str, name: str | None = None) -> Iterator[None]:
    """Turn ``huggingface_hub``'s exceptions into one-line SourceErrors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{source.uri}@{source.revision}"
    try:
        yield
    except GatedRepoError:
        raise SourceError(_gated_message(source, hub, has_token=_has_token())) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{source.uri}: no such model repository on {hub.endpoint} (if it is private, set HF_TOKEN "
            "or run `hf auth login`); check the recipe's `source`"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"{source.uri} has no revision {source.revision!r}; check the recipe's `revision` "
            "(a branch, tag or commit hash)"
        ) from None
    except RemoteEntryNotFoundError:
        raise SourceError(f"{what} has no file {name!r}; run `mlcbuild lock --update` on the recipe") from None
    except LocalEntryNotFoundError as exc:  # offline or unreachable, and not cached
        raise SourceError(_network_message(source, hub, action, name, exc)) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise SourceError(f"{hub.endpoint} answered HTTP {status} for {what}; try again later") from None
    except Exception as exc:
        if _is_network_error(exc):
            raise SourceError(_network_message(source, hub, action, name, exc)) from None
        raise


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "TimeoutError", "OfflineModeIsEnabled"})


def _network_message(source: HubSource, hub: HubSettings, action: str, name: str | None, exc: BaseException) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if action == "resolve":
        return (
            f"cannot reach {hub.endpoint} to resolve {source.uri}@{source.revision} ({reason}) and the "
            "recipe has no lock file: connect to the network, or set HF_ENDPOINT to a reachable Hub mirror"
        )
    return (
        f"cannot download {name} of {source.uri} from {hub.endpoint} ({reason}): check the network and "
        "run again; files already downloaded are kept and not fetched again"
    )


def _gated_message(source: HubSource, hub: HubSettings, has_token: bool) -> str:
    page = f"{hub.endpoint}/{source.repo_id}"
    if has_token:
        return f"{source.uri} is gated and your HF_TOKEN has no access: accept its license at {page}, then run again"
    return (
        f"{source.uri} is gated: accept its license at {page} and set HF_TOKEN (or run `hf auth login`), then run again"
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
