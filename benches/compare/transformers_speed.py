#!/usr/bin/env python3
"""transformers (PyTorch, f32) prefill and decode tokens/s on the weights of a GGUF, measured the way
benches/generation.rs measures pai and llama_cpp_speed.py measures llama.cpp: the same prompt tokens,
medians of --reps repetitions after one warm-up, repetitions where other processes used more than a
tenth of a core left out. transformers dequantizes the GGUF to f32 at load, so this is the dense GEMM
path on the same weights. Prints JSON."""
import argparse
import json
import os
import time
from pathlib import Path

from llama_cpp_speed import ROOT, measure, proc_status_bytes, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(os.environ.get("PAI_HOME", Path.home() / ".pai"))
                                           / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    baseline_rss = proc_status_bytes("VmRSS")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    path = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    text = (ROOT / "tests" / "fixtures" / "perplexity.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < args.prefill:
        ids = ids + ids
    ids = ids[: args.prefill]
    prompt = torch.tensor([ids])

    @torch.inference_mode()
    def prefill():
        t = time.perf_counter()
        # Only the last position's logits, as a server needs and as pai and llama.cpp compute them.
        model(prompt, logits_to_keep=1, use_cache=True, past_key_values=DynamicCache())
        return len(ids), time.perf_counter() - t

    @torch.inference_mode()
    def decode():
        cache = DynamicCache()
        model(prompt[:, :16], use_cache=True, past_key_values=cache, logits_to_keep=1)
        t = time.perf_counter()
        for i in range(args.decode - 1):
            # One token per step through the KV cache; which token is fed does not change the work.
            model(torch.tensor([[ids[17 + i % 64]]]), use_cache=True, past_key_values=cache)
        return args.decode - 1, time.perf_counter() - t

    results = {}
    for name, fn in [("prefill", prefill), ("decode", decode)]:
        reps = [measure(fn) for _ in range(args.reps + 1)]
        results[name] = summary(reps[1:])
    print(json.dumps({"runtime": f"transformers ({transformers.__version__}, torch {torch.__version__}, "
                                 f"f32, n_threads={args.threads})",
                      "model": args.model, "prefill_tokens": args.prefill, "decode_tokens": args.decode,
                      "peak_rss_bytes": proc_status_bytes("VmHWM"),
                      "interpreter_rss_bytes": baseline_rss, "results": results}))


if __name__ == "__main__":
    main()
