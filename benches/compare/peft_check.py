#!/usr/bin/env python3
"""Interoperability of pai's adapters with PEFT: the same adapter, applied by PEFT to the same base
(transformers reading the GGUF, dequantized to f32), must move the model's logits as it does in pai.

Given the GGUF, a pai-trained adapter directory and a JSON file of pai's logits (written by
`pai-train logits --dequantize`, on the same token ids), this loads the adapter with
`PeftModel.from_pretrained`, computes the logits of the same ids with and without it, and checks:
  * pai's base logits against transformers' (the same f32 weights): max |diff| <= --tol;
  * pai's adapted logits against PEFT's: max |diff| <= --tol;
  * the adapter's effect (adapted - base) agrees: max |diff| <= --tol.
Exits non-zero on a mismatch. Run it through benches/compare/interop_check.sh.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--pai", required=True, help="JSON from pai-train logits")
    ap.add_argument("--tol", type=float, default=2e-3)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    pai = json.loads(Path(args.pai).read_text())
    ids = torch.tensor([pai["ids"]], dtype=torch.long)
    model_path = Path(args.model)
    base = AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, torch_dtype=torch.float32
    )
    base.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[0].numpy()
    peft = PeftModel.from_pretrained(base, args.adapter)
    peft.eval()
    with torch.no_grad():
        peft_logits = peft(input_ids=ids).logits[0].numpy()

    pai_base = np.array(pai["base"], dtype=np.float32)
    pai_adapted = np.array(pai["adapted"], dtype=np.float32)
    checks = {
        "base": float(np.abs(pai_base - base_logits).max()),
        "adapted": float(np.abs(pai_adapted - peft_logits).max()),
        "effect": float(np.abs((pai_adapted - pai_base) - (peft_logits - base_logits)).max()),
    }
    effect_size = float(np.abs(peft_logits - base_logits).max())
    report = {"max_abs_diff": checks, "adapter_effect_max": effect_size, "tokens": len(pai["ids"]),
              "tol": args.tol}
    print(json.dumps(report))
    if effect_size < 10 * args.tol:
        print(f"the adapter barely moves the logits ({effect_size}); the check would prove nothing",
              file=sys.stderr)
        sys.exit(1)
    bad = {k: v for k, v in checks.items() if v > args.tol}
    if bad:
        print(f"pai and PEFT disagree: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
