"""Measure an OpenAI-compatible server the way its users feel it: streamed completions over HTTP.

Single stream: sequential streamed completions; time to first token (request sent → first text) and
decode tokens/s (tokens after the first / time from the first to the last). Concurrent: N clients, each
streaming its requests back to back, models assigned round robin from --models; total completion
tokens / wall time. Every request's prompt is different (a request number in front), so that no
server answers from a cached prefix. The client does as little per chunk as it can (a line split; JSON
only for the usage chunk): on 2 cores a heavier client (the `openai` SDK parses every chunk into
objects) takes CPU the servers need, and measures itself. Token counts come from the stream's usage
chunk where the server sends one, else one token per text chunk (both servers stream a chunk per
token).

Prints one JSON object.
"""

import argparse
import asyncio
import itertools
import json
import statistics
import time

import httpx

PROMPT = (
    "The history of the written word begins with marks pressed into clay. Over centuries, scribes "
    "turned these marks into signs for sounds, and the signs into alphabets that"
)
REQUEST = itertools.count()


async def one(client, url, model, max_tokens):
    """Stream one completion: (time to first text, decode seconds, completion tokens)."""
    body = {
        "model": model,
        "prompt": f"Request {next(REQUEST)}. {PROMPT}",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    last = started
    chunks = 0
    usage = None
    async with client.stream("POST", f"{url}/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"usage":{' in line.replace(" ", ""):
                u = json.loads(line[6:]).get("usage")
                if u:
                    usage = u["completion_tokens"]
            if '"text":""' in line.replace(" ", "") or '"text":' not in line:
                continue
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
    ap.add_argument("--single-model", required=True, help="a model id, or auto: the first listed")
    ap.add_argument("--models", required=True, help="comma-separated, assigned round robin (auto: the first listed)")
    ap.add_argument("--single-reps", type=int, default=8)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-single", action="store_true")
    a = ap.parse_args()
    client = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64))
    # "auto": the server's first model (its base).
    first_id = (await client.get(f"{a.url}/models")).json()["data"][0]["id"]
    if a.single_model == "auto":
        a.single_model = first_id
    a.models = ",".join(first_id if m == "auto" else m for m in a.models.split(","))
    await one(client, a.url, a.single_model, 8)  # warm-up
    out = {}
    if not a.skip_single:
        ttft, rates, tokens = [], [], []
        for _ in range(a.single_reps):
            t, d, n = await one(client, a.url, a.single_model, a.max_tokens)
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
            _, _, n = await one(client, a.url, models[k % len(models)], a.max_tokens)
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
