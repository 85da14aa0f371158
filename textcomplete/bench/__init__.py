"""Benchmarks: figures printed for people, never asserted in tests.

`engine_bench` measures the engine in-process (decode and prefill throughput).
"""
