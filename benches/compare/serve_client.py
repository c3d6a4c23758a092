"""Measure an OpenAI-compatible server the way its users feel it, with the official `openai` SDK.

Single stream: sequential streamed completions; time to first token (request sent → first text) and
decode tokens/s (tokens after the first / time from the first to the last). Concurrent: N clients, each
streaming its requests back to back, models assigned round robin from --models; total completion
tokens / wall time. Token counts come from the stream's usage chunk where the server sends one, else
one token per text chunk (both servers stream a chunk per token).

Prints one JSON object.
"""

import argparse
import asyncio
import json
import statistics
import time

from openai import AsyncOpenAI

PROMPT = (
    "The history of the written word begins with marks pressed into clay. Over centuries, scribes "
    "turned these marks into signs for sounds, and the signs into alphabets that"
)


async def one(client, model, max_tokens):
    """Stream one completion: (time to first text, decode seconds, completion tokens)."""
    started = time.perf_counter()
    first = None
    last = started
    chunks = 0
    usage = None
    stream = await client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.text:
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                chunks += 1
    tokens = usage if usage else chunks
    if first is None:
        first = last
    return first - started, last - first, tokens


def percentile(values, p):
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--single-model", required=True)
    ap.add_argument("--models", required=True, help="comma-separated, assigned round robin")
    ap.add_argument("--single-reps", type=int, default=8)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-single", action="store_true")
    a = ap.parse_args()
    client = AsyncOpenAI(base_url=a.url, api_key="unused", timeout=600, max_retries=0)
    await one(client, a.single_model, 8)  # warm-up
    out = {}
    if not a.skip_single:
        ttft, rates, tokens = [], [], []
        for _ in range(a.single_reps):
            t, d, n = await one(client, a.single_model, a.max_tokens)
            ttft.append(t)
            tokens.append(n)
            if n > 1 and d > 0:
                rates.append((n - 1) / d)
        out["single"] = {
            "model": a.single_model,
            "decode_tokens_per_s_median": statistics.median(rates) if rates else None,
            "decode_tokens_per_s": rates,
            "ttft_s_p50": percentile(ttft, 50),
            "ttft_s_p99": percentile(ttft, 99),
            "ttft_s": ttft,
            "completion_tokens": tokens,
        }
    models = a.models.split(",")

    async def stream_client(k):
        total = 0
        for _ in range(a.per_stream):
            _, _, n = await one(client, models[k % len(models)], a.max_tokens)
            total += n
        return total

    started = time.perf_counter()
    totals = await asyncio.gather(*(stream_client(k) for k in range(a.streams)))
    wall = time.perf_counter() - started
    out["concurrent"] = {
        "streams": a.streams,
        "models": models,
        "completion_tokens": sum(totals),
        "wall_s": wall,
        "tokens_per_s": sum(totals) / wall,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
