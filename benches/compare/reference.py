#!/usr/bin/env python3
"""Write the reference fixtures pai-model's tests compare against (tests/fixtures/reference.json).

Two reference implementations read the same GGUF file pai loads:
  * llama.cpp through llama-cpp-python (the quantized model, as pai runs it);
  * transformers, which dequantizes the GGUF to f32 (a second opinion on the same weights).

Recorded:
  * token ids of a dozen varied texts, with and without control-token parsing (llama.cpp; transformers'
    ids alongside for information);
  * the mean NLL / perplexity of a fixed ~2,000-token Python text (tests/fixtures/perplexity.txt),
    scored in one context by both tools;
  * greedy continuations of 5 prompts (llama.cpp; transformers alongside).

Run it with benches/compare/reference.sh, which sets up the venv. The fixtures are only ever written here.
"""
import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
PPL_TEXT = FIXTURES / "perplexity.txt"
N_CONTINUATION = 48
TOP_K = 5
PPL_TOKENS = 2000

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(user):
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


TEXTS = [
    "Hello world",
    "def greet(name: str) -> str:\n    return f\"Hello, {name}!\"\n\nprint(greet('pai'))\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "naïve café, Ünïcödé — “curly quotes” and ‘single’ … ellipsis",
    "日本語のテキストと中文混合，한국어도 조금.",
    "Emoji: 🙂👍🏽🚀 and a family 👨‍👩‍👧‍👦 in a row",
    "a   b\t\tc\n\n\n   d    \n\t \n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "In 2024 there were 365 days; pi is 3.14159 and 1234567.89 is a big number.",
    "# Notes\n\n- item one\n- [a link](https://example.com/x?y=1)\n\n```bash\nls -la ~/notes\n```\n",
    "I'm sure you'll see it's 'fine' -- isn't it?! We've done this; they'd agree.",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום",
    "    if x<=0:\n        raise ValueError('x must be > 0')  # guard\n",
]

PROMPTS = [
    chat("What is the capital of France?"),
    chat("Write a Python function that reverses a string."),
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    chat("Give me three tips for writing clean code."),
]


def perplexity_text(tokenize):
    """The fixed text: the committed file, or (first run only) the head of CPython's textwrap.py."""
    if PPL_TEXT.exists():
        return PPL_TEXT.read_text()
    import textwrap

    lines = Path(textwrap.__file__).read_text().splitlines(keepends=True)
    text = ""
    for line in lines:
        if len(tokenize(text + line)) > PPL_TOKENS:
            break
        text += line
    PPL_TEXT.write_text(text)
    return text


def mean_nll(logits, ids):
    """Mean NLL of ids[1:] given logits[:-1] (float64 log-softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    nll = -np.array([logp[i - 1, ids[i]] for i in range(1, len(ids))])
    return float(nll.mean())


def llama_cpp_reference(model_path):
    from llama_cpp import Llama, __version__

    llm = Llama(model_path=str(model_path), n_ctx=4096, n_batch=512, n_threads=2, logits_all=True,
                verbose=False, seed=0)

    def tok(text, special):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    tokens = [{"text": t, "ids_control": tok(t, True), "ids_plain": tok(t, False)} for t in TEXTS]

    text = perplexity_text(lambda s: tok(s, False))
    ids = tok(text, False)
    llm.reset()
    llm.eval(ids)
    ppl_nll = mean_nll(llm.scores[: len(ids)], ids)

    def greedy(model, prompt_ids):
        model.reset()
        model.eval(prompt_ids)
        out, top = [], []
        for _ in range(N_CONTINUATION):
            logits = model.scores[model.n_tokens - 1]
            best = np.argsort(-logits)[:TOP_K]
            top.append([[int(i), round(float(logits[i]), 4)] for i in best])
            nxt = int(best[0])
            out.append(nxt)
            if nxt == model.token_eos():
                break
            model.eval([nxt])
        return out, top

    continuations = []
    for p in PROMPTS:
        prompt_ids = tok(p, True)
        out, top = greedy(llm, prompt_ids)
        continuations.append({"prompt": p, "prompt_ids": prompt_ids, "ids": out, "top_logits": top})

    # How stable llama.cpp's own greedy choices are: the same file with flash attention on.
    fa = Llama(model_path=str(model_path), n_ctx=4096, n_batch=512, n_threads=2, logits_all=True,
               verbose=False, seed=0, flash_attn=True)
    for c in continuations:
        c["ids_flash_attn"] = greedy(fa, c["prompt_ids"])[0]
    return __version__, tokens, text, ids, ppl_nll, continuations


def spm_reference(texts):
    """A SentencePiece (llama-style) vocabulary: trained here with the sentencepiece library on the
    fixture texts, written as a vocab-only GGUF (tests/fixtures/spm-vocab.gguf), and tokenized by
    llama.cpp and by sentencepiece itself."""
    import tempfile

    import gguf
    import sentencepiece as spm
    from llama_cpp import Llama

    corpus = "\n".join(texts + [PPL_TEXT.read_text()])
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "corpus.txt"
        src.write_text(corpus)
        spm.SentencePieceTrainer.train(
            input=str(src), model_prefix=str(Path(d) / "spm"), model_type="bpe", vocab_size=600,
            byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=str(Path(d) / "spm.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    path = FIXTURES / "spm-vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for t in texts:
        if "<|" in t:
            continue
        cases.append({"text": t,
                      "ids_llama_cpp": llm.tokenize(t.encode("utf-8"), add_bos=False, special=False),
                      "ids_sentencepiece": sp.encode(t)})
    return {"file": path.name, "vocab_size": len(tokens), "cases": cases}


def transformers_reference(model_path, ids, tokens, continuations):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, f = str(model_path.parent), model_path.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    hf_ids = [tokenizer.encode(t["text"], add_special_tokens=False) for t in tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        nll = mean_nll(logits, ids)
        conts = []
        for c in continuations:
            out = model.generate(torch.tensor([c["prompt_ids"]]), max_new_tokens=N_CONTINUATION,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
            conts.append(out[0, len(c["prompt_ids"]):].tolist())
        peft_case = peft_reference(model, continuations[2]["prompt_ids"])
    return transformers.__version__, hf_ids, nll, conts, peft_case


def peft_reference(model, ids):
    """An adapter made by PEFT itself (random A and B, all seven projections, rsLoRA off), saved to
    tests/fixtures/peft-adapter/, and the change it makes to the logits of `ids` under transformers:
    for the last 4 positions, the difference on a fixed spread of token ids."""
    import peft
    import torch

    torch.manual_seed(1234)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"])
    with torch.no_grad():
        base = model(torch.tensor([ids])).logits[0, -4:].numpy()
        pm = peft.get_peft_model(model, cfg)
        # PEFT's kaiming init of B is far stronger than training ever makes it; scale it to a realistic size.
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
        adapted = pm(torch.tensor([ids])).logits[0, -4:].numpy()
        out_dir = FIXTURES / "peft-adapter"
        pm.save_pretrained(str(out_dir))
        pm.unload()
    probe = list(range(0, base.shape[1], 97))
    return {"dir": "peft-adapter", "peft": peft.__version__, "ids": ids, "probe_ids": probe,
            "base_logits": [[round(float(r[i]), 4) for i in probe] for r in base],
            "delta": [[round(float(a[i] - b[i]), 4) for i in probe] for a, b in zip(adapted, base)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path,
                    default=Path(os.environ.get("PAI_HOME", Path.home() / ".pai")) / "models"
                    / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}; run scripts/fetch-model.sh first")
    FIXTURES.mkdir(parents=True, exist_ok=True)

    llama_version, tokens, text, ids, llama_nll, continuations = llama_cpp_reference(args.model)
    print(f"llama.cpp {llama_version}: {len(ids)} tokens, NLL {llama_nll:.5f}, PPL {math.exp(llama_nll):.4f}")
    fa_agree = sum(c["ids"][:32] == c["ids_flash_attn"][:32] for c in continuations)
    print(f"llama.cpp with flash attention on agrees with itself (off) on the first 32 greedy tokens for {fa_agree}/5")
    out = {
        "model": args.model.name,
        "generated_by": "benches/compare/reference.py",
        "platform": platform.platform(),
        "llama_cpp_python": llama_version,
        "tokenizer": tokens,
        "perplexity": {
            "file": PPL_TEXT.name,
            "tokens": len(ids),
            "ids": ids,
            "llama_cpp": {"mean_nll": llama_nll, "perplexity": math.exp(llama_nll)},
        },
        "continuations": continuations,
    }
    out["spm"] = spm_reference(TEXTS)
    agree = sum(c["ids_llama_cpp"] == c["ids_sentencepiece"] for c in out["spm"]["cases"])
    print(f"SentencePiece vocab: llama.cpp and sentencepiece agree on {agree}/{len(out['spm']['cases'])} texts")
    if not args.no_transformers:
        tf_version, hf_ids, tf_nll, tf_conts, peft_case = transformers_reference(args.model, ids, tokens,
                                                                                  continuations)
        out["peft"] = peft_case
        print(f"transformers {tf_version}: NLL {tf_nll:.5f}, PPL {math.exp(tf_nll):.4f}")
        out["transformers"] = tf_version
        out["perplexity"]["transformers"] = {"mean_nll": tf_nll, "perplexity": math.exp(tf_nll)}
        for t, h in zip(out["tokenizer"], hf_ids):
            t["ids_transformers"] = h
        for c, h in zip(out["continuations"], tf_conts):
            c["ids_transformers"] = h
        agree = sum(c["ids"][:32] == c["ids_transformers"][:32] for c in out["continuations"])
        print(f"greedy continuations: llama.cpp and transformers agree on the first 32 tokens for {agree}/5")
    path = FIXTURES / "reference.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
