"""`usage.prompt_tokens_details.cached_tokens` and `system_fingerprint` over HTTP (streams and non-streams)."""

from __future__ import annotations

import random

from tests.e2e.helpers import body, post, stream_chunks

BLOCK = 16


def test_cached_tokens_exact_for_a_shared_prefix(http):
    rng = random.Random(2024)
    prefix = [rng.randrange(100, 40000) for _ in range(3 * BLOCK + 5)]
    first = post(http, body(prompt=prefix + [rng.randrange(100, 40000) for _ in range(4)], max_tokens=2)).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = post(http, body(prompt=prefix + [rng.randrange(100, 40000) for _ in range(6)], max_tokens=2)).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK
    chunks = stream_chunks(http, body(prompt=prefix + [7, 8, 9], max_tokens=2, stream=True,
                                      stream_options={"include_usage": True}))
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BLOCK


def test_cache_hits_do_not_change_results(http):
    rng = random.Random(7)
    prompt = [rng.randrange(100, 40000) for _ in range(70)]
    for fields in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"echo": True, "logprobs": 2}):
        miss = post(http, body(prompt=prompt, max_tokens=10, **fields)).json()
        hit = post(http, body(prompt=prompt, max_tokens=10, **fields)).json()
        if "echo" not in fields:
            assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
        assert hit["choices"] == miss["choices"]


def test_fingerprint_is_constant_and_in_streams(http):
    prints = {post(http, body()).json()["system_fingerprint"] for _ in range(2)}
    prints |= {c["system_fingerprint"] for c in stream_chunks(http, body(stream=True))}
    assert len(prints) == 1 and prints.pop().startswith("fp_")
