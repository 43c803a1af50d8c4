"""The ``mlcbuild`` console script.

``mlcbuild run RECIPE`` whose inputs did not change since its last successful run is answered
from the run journal (``mlcbuild.pipeline.journal``) without loading the CLI framework, pydantic
or the stages: a no-op rerun is the most frequent command and should cost milliseconds. Every
other command, and every run the journal cannot vouch for, goes to ``mlcbuild.cli``, which
parses it in full.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Options of ``run`` that cannot change what an all-cached run does, and whether each takes a value.
_NEUTRAL_OPTIONS = {"--json": False, "-k": False, "--keep-going": False, "-j": True, "--jobs": True, "--cache-dir": True}


def _noop_request(argv: list[str]) -> tuple[str, str | None, bool] | None:
    """(recipe, cache dir or None, --json) for ``run RECIPE`` with only neutral options;
    None for anything else (including what the full CLI would refuse)."""
    if not argv or argv[0] != "run":
        return None
    recipe: str | None = None
    values: dict[str, str] = {}
    flags: set[str] = set()
    args = iter(argv[1:])
    for arg in args:
        name, eq, inline = arg.partition("=")
        if arg.startswith("-") and name in _NEUTRAL_OPTIONS:
            if eq and (not _NEUTRAL_OPTIONS[name] or not name.startswith("--")):
                return None  # as click: only a long option with a value takes "="
            if not _NEUTRAL_OPTIONS[name]:
                flags.add(name)
                continue
            value = inline if eq else next(args, None)
            if not value or (value.startswith("-") and name != "--cache-dir"):
                return None
            values[name] = value
        elif arg.startswith("-") or recipe is not None:
            return None
        else:
            recipe = arg
    jobs = values.get("--jobs", values.get("-j", "1"))
    if recipe is None or not jobs.isdigit() or int(jobs) < 1:
        return None
    return recipe, values.get("--cache-dir"), "--json" in flags


def _replay(recipe: str, cache_dir: str | None, as_json: bool) -> bool:
    """Print the outcome of the journaled run and return True, if the journal vouches for it."""
    started = time.perf_counter()
    from mlcbuild.cache.location import default_cache_dir
    from mlcbuild.pipeline import journal

    if not os.path.isfile(recipe):
        return False  # the full CLI says what is wrong
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    found = journal.check(journal.journal_path(root, ident := journal.run_identity(Path(recipe), root)), ident)
    if found is None:
        return False
    replay, checked = found
    events = replay["events"]
    took = time.perf_counter() - started
    if as_json:
        done = {"event": "run_done", "ok": True, "duration_s": round(took, 4), "built": 0,
                "cached": len(events), "failed": 0, "skipped": 0, "journal": True}
        sys.stdout.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in [*events, done]))
        return True
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    dim, green, reset = ("\x1b[2m", "\x1b[32m", "\x1b[0m") if color else ("", "", "")
    lines = [f"{dim}cached {e['node']}{reset}" for e in events]
    lines.append(f"{green}ok{reset} 0 built, {len(events)} cached, 0 failed, 0 skipped in {took:.2f}s "
                 f"{dim}(no input changed since the last run: {checked} paths checked){reset}")
    if replay.get("output_dir"):
        lines.append(f"outputs in {replay['output_dir']}")
    sys.stderr.write("\n".join(lines) + "\n")
    return True


def main() -> None:
    request = _noop_request(sys.argv[1:])
    if request is not None and _replay(*request):
        sys.exit(0)
    from mlcbuild.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
