#!/usr/bin/env python3
"""PyTorch + PEFT training speed and memory in the shape of benches/train.rs (issue 6's comparison).

The same GGUF pai trains on, read by transformers (dequantized to f32, as PEFT users on a CPU run it),
LoRA r 16, alpha 32 on q, k, v, o; batches of 4 x 256 tokens of the same text; AdamW at 2e-4; the same
thread count. Prints one JSON line: tokens/s of each step, the median of the steps after the first, and
peak RSS. Run it through benches/compare/train_speed.sh, which sets up the venv.
"""
import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(os.environ.get("PAI_HOME", Path.home() / ".pai"))
                                            / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(ROOT / "tests" / "fixtures" / "perplexity.txt"))
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_path = Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, torch_dtype=torch.float32
    )
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                   task_type="CAUSAL_LM"),
    )
    model.train()
    ids = tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    need = 4 * 256 * (args.steps + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    batches = torch.tensor(ids, dtype=torch.long).view(-1, 4, 256)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    rates = []
    for step in range(args.steps):
        batch = batches[step]
        start = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(batch.numel() / (time.perf_counter() - start))
    later = sorted(rates[1:]) or rates
    print(json.dumps({
        "tool": "peft",
        "model": str(model_path),
        "steps": args.steps,
        "batch": "4x256",
        "tokens_per_s": rates,
        "median_tokens_per_s": statistics.median(later),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
