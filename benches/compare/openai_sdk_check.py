"""pai-serve as the official `openai` Python SDK sees it: models, chat and text completions (plain and
streamed, usage in the last chunk), adapter selection by name and `base::name`, the lineage pai adds,
log-probabilities, an adapter loaded by path, and errors raised as the SDK's own exception types.

    python openai_sdk_check.py --url http://127.0.0.1:PORT/v1 --adapter-dir DIR
Exits non-zero (an AssertionError naming the check) on the first failure.
"""

import argparse

import httpx
import openai
from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--adapter-dir", required=True, help="a PEFT directory inside the server's adapter root")
    a = ap.parse_args()
    client = OpenAI(base_url=a.url, api_key="none", max_retries=0)

    models = [m.id for m in client.models.list().data]
    base = models[0]
    assert "a0" in models, f"models: {models}"

    messages = [{"role": "user", "content": "Name one colour."}]
    chat = client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content, "an empty chat answer"
    assert chat.usage.completion_tokens > 0
    lineage = chat.model_extra["pai"]
    assert lineage["adapter"] == "a0" and lineage["version"] == "v1" and lineage["generation"], lineage

    # The same adapter as `base::a0`, streamed with usage in the last chunk.
    pieces, usage = [], None
    for chunk in client.chat.completions.create(
        model=f"{base}::a0", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat.choices[0].message.content)
    assert usage and usage.completion_tokens == chat.usage.completion_tokens, usage

    # Text completions on the base, with log-probabilities.
    text = client.completions.create(model=base, prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2)
    assert text.choices[0].text and len(text.choices[0].logprobs.tokens) == text.usage.completion_tokens
    assert all(len(t) == 2 for t in text.choices[0].logprobs.top_logprobs)
    chat_lp = client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0,
                                             logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 for t in chat_lp.choices[0].logprobs.content)
    streamed_lp = []
    for chunk in client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed_lp.extend(t.token for t in c.logprobs.content)
    assert streamed_lp == [t.token for t in chat_lp.choices[0].logprobs.content], streamed_lp

    # Errors as the SDK's exceptions: unknown model (404, never the base), an unsupported parameter,
    # a context overflow.
    for call, kind, code in [
        (lambda: client.chat.completions.create(model="nope", messages=messages), openai.NotFoundError,
         "model_not_found"),
        (lambda: client.chat.completions.create(model=base, messages=messages, extra_body={"best_of": 2}),
         openai.BadRequestError, "unsupported_parameter"),
        (lambda: client.completions.create(model=base, prompt="x", max_tokens=10**6), openai.BadRequestError,
         None),
    ]:
        try:
            call()
        except kind as e:
            assert code is None or e.code == code, (e.code, code)
        else:
            raise AssertionError(f"expected {kind.__name__}")

    # An adapter loaded by path (vLLM's route), answering by its name with its generation.
    r = httpx.post(f"{a.url}/load_lora_adapter", json={"lora_name": "loaded", "lora_path": a.adapter_dir})
    assert r.status_code == 200, r.text
    generation = r.json()["generation"]
    out = client.chat.completions.with_raw_response.create(model="loaded", messages=messages, max_tokens=4)
    assert out.headers["x-pai-generation"] == str(generation), out.headers
    assert out.parse().model_extra["pai"]["generation"] == generation
    r = httpx.post(f"{a.url}/unload_lora_adapter", json={"lora_name": "loaded"})
    assert r.status_code == 200, r.text
    print("openai SDK check: models, chat, completions, streams, adapters, logprobs, errors, load/unload: ok")


if __name__ == "__main__":
    main()
