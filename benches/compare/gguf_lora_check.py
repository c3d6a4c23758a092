#!/usr/bin/env python3
"""Interoperability of pai's GGUF adapter export with llama.cpp: `pai-train export --format gguf` must
load in llama-cpp-python (`lora_path`) and move the quantized model's logits the way the adapter moves
them in pai.

Given the GGUF base, the exported adapter GGUF and a JSON file of pai's logits (`pai-train logits`,
quantized weights as llama.cpp runs them, on the same token ids, bare and with the adapter), this runs
llama.cpp on the same ids with and without the adapter and compares the adapter's effect (adapted -
bare logits): cosine and relative RMS difference. The two runtimes round activations differently, so
their bare logits differ a little; the effect of the same adapter must still agree closely.
Exits non-zero on a mismatch. Run through benches/compare/interop_check.sh.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def logits(model, lora, ids):
    from llama_cpp import Llama

    kwargs = dict(model_path=model, n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                  seed=0)
    if lora:
        kwargs["lora_path"] = lora
    llm = Llama(**kwargs)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter-gguf", required=True)
    ap.add_argument("--pai", required=True, help="JSON from pai-train logits (quantized)")
    ap.add_argument("--min-cosine", type=float, default=0.98)
    ap.add_argument("--max-rel-rms", type=float, default=0.2)
    args = ap.parse_args()

    pai = json.loads(Path(args.pai).read_text())
    ids = pai["ids"]
    base = logits(args.model, None, ids)
    adapted = logits(args.model, args.adapter_gguf, ids)
    effect_cpp = (adapted - base).ravel()
    effect_pai = (np.array(pai["adapted"], dtype=np.float32) - np.array(pai["base"], dtype=np.float32)).ravel()
    cosine = float(effect_cpp @ effect_pai / (np.linalg.norm(effect_cpp) * np.linalg.norm(effect_pai)))
    rel_rms = float(np.linalg.norm(effect_cpp - effect_pai) / np.linalg.norm(effect_cpp))
    report = {"effect_cosine": cosine, "effect_rel_rms": rel_rms,
              "effect_max_llama_cpp": float(np.abs(effect_cpp).max()),
              "effect_max_pai": float(np.abs(effect_pai).max()),
              "bare_logits_max_abs_diff": float(np.abs(base - np.array(pai["base"], dtype=np.float32)).max()),
              "tokens": len(ids)}
    print(json.dumps(report))
    if np.abs(effect_cpp).max() < 0.05:
        print("llama.cpp's logits barely move with the adapter: was it applied?", file=sys.stderr)
        sys.exit(1)
    if cosine < args.min_cosine or rel_rms > args.max_rel_rms:
        print(f"the adapter moves llama.cpp's logits differently from pai's: {report}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
