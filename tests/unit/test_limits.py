"""The server's limits without HTTP: the bounded queue, per-key token buckets, reset durations."""

from __future__ import annotations

import pytest

from textcomplete.api.errors import APIError
from textcomplete.api.limits import Admission, KeyLimiter, ServerLimits, TokenBucket, duration


def test_admission_bounds_running_plus_queued_and_releases_once():
    admission = Admission(max_running=2, max_queued=1)
    first = admission.admit(2)
    second = admission.admit(1)
    assert admission.in_flight == 3 and admission.waiting == 1
    with pytest.raises(APIError) as refused:
        admission.admit(1)
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert int(refused.value.headers["retry-after"]) >= 1
    second.release()
    second.release()          # idempotent: every exit path may release
    assert admission.in_flight == 2
    admission.admit(1).release()
    first.release()
    assert admission.in_flight == 0


def test_a_request_larger_than_the_bound_runs_when_alone():
    admission = Admission(max_running=1, max_queued=0)
    big = admission.admit(5)
    with pytest.raises(APIError):
        admission.admit(1)
    big.release()
    assert admission.in_flight == 0


def test_token_bucket_refills_over_a_minute():
    bucket = TokenBucket(60)
    bucket.updated = 100.0
    assert bucket.take(60, now=100.0) == 0
    assert bucket.take(1, now=100.0) == pytest.approx(1.0)     # one per second comes back
    assert bucket.take(1, now=101.0) == 0
    assert bucket.remaining(now=131.0) == 30
    assert bucket.until_full(now=131.0) == pytest.approx(30.0)


def test_key_limiter_keeps_keys_apart_and_refuses_impossible_requests():
    limiter = KeyLimiter(requests_per_minute=2, tokens_per_minute=100)
    limiter.charge("key_a", 10)
    limiter.charge("key_a", 10)
    with pytest.raises(APIError) as too_fast:
        limiter.charge("key_a", 10)
    assert too_fast.value.status == 429 and too_fast.value.type == "requests"
    assert "x-should-retry" not in too_fast.value.headers
    limiter.charge("key_b", 10)                   # another key has its own budget
    with pytest.raises(APIError) as too_big:
        limiter.charge("key_b", 101)
    assert too_big.value.type == "tokens" and too_big.value.headers["x-should-retry"] == "false"
    headers = limiter.headers("key_a")
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "100" and headers["x-ratelimit-remaining-tokens"] == "80"


def test_tokens_refusal_gives_the_request_back():
    limiter = KeyLimiter(requests_per_minute=5, tokens_per_minute=50)
    limiter.charge("k", 40)
    with pytest.raises(APIError):
        limiter.charge("k", 40)
    assert limiter.headers("k")["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.0123, "12ms"), (1.5, "1.5s"), (360, "6m0s")])
def test_reset_durations_read_like_openai_headers(seconds, text):
    assert duration(seconds) == text


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError):
        ServerLimits(max_request_body_bytes=0)
    with pytest.raises(ValueError):
        ServerLimits(requests_per_minute=-1)


def test_admission_bounds_the_kv_tokens_requests_may_need():
    admission = Admission(max_running=8, max_queued=8, max_kv_tokens=1000)
    first = admission.admit(2, kv_tokens=600)
    with pytest.raises(APIError) as refused:      # 600 + 500 > 1000: wait for the first to finish
        admission.admit(1, kv_tokens=500)
    assert refused.value.status == 429 and "KV cache" in refused.value.message
    assert admission.in_flight == 2 and admission.kv_tokens == 600   # a refusal takes nothing
    second = admission.admit(1, kv_tokens=400)
    first.release()
    first.release()
    assert admission.kv_tokens == 400
    second.release()
    assert admission.kv_tokens == 0 and admission.in_flight == 0
    assert admission.fits_alone(1000) and not admission.fits_alone(1001)
    assert Admission(1, 0).fits_alone(10 ** 9)    # no bound configured
