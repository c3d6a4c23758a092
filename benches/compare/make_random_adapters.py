"""Write random PEFT LoRA adapters (r 16, q/k/v/o) for the default model: small B, so they move the
model's output a little without breaking it. For benchmarks and the OpenAI SDK check.

    python make_random_adapters.py OUT_DIR N   # writes OUT_DIR/a0 … OUT_DIR/a{N-1}
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

root, count = sys.argv[1], int(sys.argv[2])
hidden, kv, layers, r = 576, 192, 30, 16
dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}
for n in range(count):
    rng = np.random.default_rng(n)
    d = os.path.join(root, f"a{n}")
    os.makedirs(d, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for proj, (i, o) in dims.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.uniform(-1, 1, (r, i)).astype(np.float32) / np.sqrt(i)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.002, (o, r)).astype(np.float32)
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
              "target_modules": list(dims), "use_rslora": False,
              "base_model_name_or_path": "SmolLM2-135M-Instruct"}
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f)
