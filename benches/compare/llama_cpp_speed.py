#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) prefill and decode tokens/s on a GGUF, measured the way
benches/generation.rs measures pai: the same prompt tokens, medians of --reps repetitions after one
warm-up, repetitions where other processes used more than a tenth of a core left out. Prints JSON."""
import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]


def own_jiffies():
    t = os.times()
    return (t.user + t.system) * 100


def measure(fn):
    b0, o0, w0 = busy_jiffies(), own_jiffies(), time.perf_counter()
    tokens, seconds = fn()
    elapsed = time.perf_counter() - w0
    others = max(0.0, (busy_jiffies() - b0) - (own_jiffies() - o0)) / 100 / elapsed
    return {"tokens_per_second": tokens / seconds, "others_cores": others}


def summary(reps):
    """Median and spread over the uncontended repetitions, or over all when every one was contended (a
    run under load on purpose), as pai's bench reports them."""
    clean = sorted(r["tokens_per_second"] for r in reps if r["others_cores"] < 0.1)
    contended = not clean
    v = sorted(r["tokens_per_second"] for r in reps) if contended else clean
    return {"median_tokens_per_second": v[len(v) // 2], "min_tokens_per_second": v[0],
            "max_tokens_per_second": v[-1], "reps_used": len(v), "contended": contended, "reps": reps}


def proc_status_bytes(field):
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(os.environ.get("PAI_HOME", Path.home() / ".pai"))
                                           / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # What the interpreter holds before llama.cpp is loaded, to tell it apart from llama.cpp's own memory.
    baseline_rss = proc_status_bytes("VmRSS")
    from llama_cpp import Llama, __version__

    llm = Llama(model_path=args.model, n_ctx=2048, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    text = (ROOT / "tests" / "fixtures" / "perplexity.txt").read_text()
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    while len(ids) < args.prefill:
        ids = ids + ids
    ids = ids[: args.prefill]

    def prefill():
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return len(ids), time.perf_counter() - t

    def decode():
        llm.reset()
        llm.eval(ids[:16])
        t = time.perf_counter()
        # One token per step through the KV cache; which token is fed does not change the work.
        for i in range(args.decode - 1):
            llm.eval([ids[17 + i % 64]])
        return args.decode - 1, time.perf_counter() - t

    results = {}
    for name, fn in [("prefill", prefill), ("decode", decode)]:
        reps = [measure(fn) for _ in range(args.reps + 1)]
        results[name] = summary(reps[1:])
    print(json.dumps({"runtime": f"llama.cpp (llama-cpp-python {__version__}, n_threads={args.threads})",
                      "model": args.model, "prefill_tokens": args.prefill, "decode_tokens": args.decode,
                      "peak_rss_bytes": proc_status_bytes("VmHWM"),
                      "interpreter_rss_bytes": baseline_rss, "results": results}))


if __name__ == "__main__":
    main()
