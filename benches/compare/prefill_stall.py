"""How much a long prompt arriving stalls a stream that is already running.

One client streams a completion; once it has received --warm tokens, a second client sends a long
prompt (--prompt-tokens words, about as many tokens) for one token. Reports, for the running stream,
the largest gap between two of its chunks and the median gap, and for the newcomer its time to first
token. Run it against the same server started with different prefill chunk sizes to see the trade:
smaller chunks keep the running stream smooth, larger ones answer the newcomer sooner.

Prints one JSON object.
"""

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def stream(client, url, model, max_tokens, warm, started_long):
    body = {"model": model, "prompt": "Request A. The river bends where", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    times = []
    async with client.stream("POST", f"{url}/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            times.append(time.perf_counter())
            if len(times) == warm:
                started_long.set()
    return times


async def long_prompt(url, model, words, started_long):
    await started_long.wait()
    text = " ".join(f"word{i % 97}" for i in range(words))
    body = {"model": model, "prompt": f"Request B. {text}", "max_tokens": 1, "temperature": 0,
            "stream": True}
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", f"{url}/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    return t0, time.perf_counter() - t0
    return t0, float("nan")


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:18080/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--warm", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    a = p.parse_args()
    started_long = asyncio.Event()
    async with httpx.AsyncClient(timeout=600) as client:
        times, (t_long, ttft_long) = await asyncio.gather(
            stream(client, a.url, a.model, a.max_tokens, a.warm, started_long),
            long_prompt(a.url, a.model, a.prompt_tokens, started_long),
        )
    gaps = [b - a_ for a_, b in zip(times, times[1:])]
    after = [g for t, g in zip(times[1:], gaps) if t > t_long]
    print(json.dumps({
        "stream_gap_max_ms": round(1000 * max(after or gaps), 1),
        "stream_gap_median_ms": round(1000 * statistics.median(gaps), 1),
        "newcomer_ttft_ms": round(1000 * ttft_long, 1),
        "stream_chunks": len(times),
    }))


asyncio.run(main())
