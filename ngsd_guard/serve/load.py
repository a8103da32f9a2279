"""A bounded load run against an OpenAI-compatible endpoint: streamed chat completions from N
concurrent clients, each sending requests back to back.

    python -m ngsd_guard.serve.load --url http://127.0.0.1:8000 --clients 1,4,16

For each client count: requests/s, completion tokens/s (from the usage chunk), p50 and p95
time to the first content token, and errors. Each level ends after ``--requests`` requests per
client or ``--seconds``, whichever comes first (requests in flight are finished).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

import httpx

PROMPTS = (
    "Give me three tips for staying focused while studying.",
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle for a ten-year-old.",
    "How do I make a bomb at home?",
    "List some healthy breakfast ideas.",
    "Why do cats purr?",
)


@dataclass
class Level:
    """What one client count measured."""

    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple:
    """(time to first content token, completion tokens) of one streamed request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - started, tokens


async def run_level(
    url: str, model: str, clients: int, requests: int, seconds: float, max_tokens: int, key: str
) -> Level:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    ttfts: list[float] = []
    tokens = errors = done = 0
    started = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient, number: int) -> None:
        nonlocal tokens, errors, done
        for sent in range(requests):
            if time.perf_counter() - started > seconds:
                return
            prompt = PROMPTS[(number + sent) % len(PROMPTS)]
            try:
                ttft, count = await _one(client, model, prompt, max_tokens)
            except (httpx.HTTPError, RuntimeError):
                errors += 1
                continue
            ttfts.append(ttft)
            tokens += count
            done += 1

    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=600, limits=limits
    ) as client:
        await asyncio.gather(*(client_loop(client, n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    return Level(
        clients=clients,
        requests=done,
        errors=errors,
        seconds=round(elapsed, 2),
        requests_per_s=round(done / elapsed, 3),
        tokens_per_s=round(tokens / elapsed, 2),
        ttft_p50_s=round(statistics.median(ttfts), 3) if ttfts else float("nan"),
        ttft_p95_s=round(quantiles[18], 3) if ttfts else float("nan"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client and level")
    parser.add_argument("--seconds", type=float, default=300, help="time limit per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="one JSON object per level")
    args = parser.parse_args()
    levels = [
        asyncio.run(
            run_level(
                args.url, args.model, n, args.requests, args.seconds, args.max_tokens, args.api_key
            )
        )
        for n in (int(c) for c in args.clients.split(","))
    ]
    if args.json:
        for level in levels:
            print(json.dumps(asdict(level)))
        return
    base = levels[0].tokens_per_s or float("nan")
    print("| clients | requests | req/s | tokens/s | × 1st level | TTFT p50 | TTFT p95 | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in levels:
        print(
            f"| {level.clients} | {level.requests} | {level.requests_per_s:.2f} "
            f"| {level.tokens_per_s:.1f} | {level.tokens_per_s / base:.2f} "
            f"| {level.ttft_p50_s:.2f} s | {level.ttft_p95_s:.2f} s | {level.errors} |"
        )


if __name__ == "__main__":
    main()
