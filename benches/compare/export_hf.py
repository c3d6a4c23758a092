#!/usr/bin/env python3
"""Export a GGUF, as transformers reads it (dequantized to f32), to a Hugging Face directory
(config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja, model.safetensors), to check
pai's Hugging Face loading on a real model:

    bash -c 'source benches/compare/env.sh && python benches/compare/export_hf.py OUT'
    pai-train perplexity --model OUT --file tests/fixtures/perplexity.txt   # transformers: 8.7447
"""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    out = Path(sys.argv[1])
    gguf = Path(sys.argv[2]) if len(sys.argv) > 2 else (
        Path(os.environ.get("PAI_HOME", Path.home() / ".pai")) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    # save_pretrained refuses GGUF-loaded models; save_model keeps one name per tied tensor.
    save_model(model, str(out / "model.safetensors"))
    print(out)


if __name__ == "__main__":
    main()
