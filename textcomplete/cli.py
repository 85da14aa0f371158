"""The `textcomplete` command line: generate text and benchmark the engine.

Engine options come from `EngineConfig`'s fields, so the help text is the config's own documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys

from textcomplete import __version__
from textcomplete.api.limits import ServerLimits
from textcomplete.cluster.options import add_cluster_arguments, cluster_options
from textcomplete.config import EngineConfig, parse_size
from textcomplete.models.registry import families_text


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        name = f.name.removeprefix("enable_")
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_show_default(f.name, f.default)})"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
            continue
        kind = parse_size if f.name == "kv_cache_memory" else (str if f.type in ("str", str) else int)
        group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text)


def _show_default(name: str, value: object) -> str:
    if name == "kv_cache_memory":
        return "a quarter of available memory" if value is None else f"{value / (1 << 30):g}GiB"
    return str(value)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def _cmd_generate(args: argparse.Namespace) -> int:
    from textcomplete.engine.engine import LLMEngine
    from textcomplete.engine.sampling_params import SamplingParams
    engine = LLMEngine(_engine_config(args))
    prompt_ids = engine.tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed_request)
    [outputs] = engine.generate([prompt_ids], params)
    generated = [t for out in outputs for t in out.new_token_ids]
    print(args.prompt + engine.tokenizer.decode(generated, skip_special_tokens=True))
    print(f"[{len(prompt_ids)} prompt tokens, {len(generated)} generated, finish: {outputs[-1].finish_reason}]",
          file=sys.stderr)
    return 0


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from textcomplete.bench import engine_bench
    from textcomplete.engine.engine import LLMEngine
    engine = LLMEngine(_engine_config(args))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results = engine_bench.run(engine, batches, args.decode_steps, args.prompt_len)
    shared = engine_bench.measure_shared_prefix(engine) if args.shared_prefix else None
    threads = args.threads or os.cpu_count()
    print(f"model {engine.description}, {threads} threads, {platform.processor() or platform.machine()}")
    print(engine_bench.format_table(results))
    if shared is not None:
        print(shared.format())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import signal

    import uvicorn

    from textcomplete.api.http_protocol import protocol_with_header_timeout
    from textcomplete.api.server import build_app, shutting_down
    from textcomplete.api.serving import CompletionService
    from textcomplete.engine.async_engine import AsyncEngine
    from textcomplete.engine.engine import freeze_loaded_objects
    _, keys, limits, config, names = _serve_settings(args)
    engine = _serving_engine(args, config, limits, AsyncEngine)
    freeze_loaded_objects()
    service = CompletionService(engine, names, limits)
    service.fault_injection = args.enable_fault_injection
    log = logging.getLogger("textcomplete")
    log.info("serving %s on http://%s:%d/v1 (%s)", names[0], args.host, args.port,
             "API keys required" if keys else "no API key required")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # uvicorn cancels what is still running at the deadline, and a cancelled stream cannot say why.
            # Shortly before it, fail every engine request instead: streams end with an in-band error event
            # and [DONE], other requests with a 503 envelope, and their connections close in time.
            ending = asyncio.create_task(fail_in_flight_before(args.shutdown_timeout))
            try:
                await super().shutdown(sockets)
            finally:
                ending.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                if self._captured_signals:   # SIGTERM/SIGINT asked for this shutdown: it is a clean exit
                    log.info("shut down on %s", ", ".join(signal.Signals(s).name for s in self._captured_signals))
                    self._captured_signals.clear()

    async def fail_in_flight_before(deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - min(1.0, deadline / 2)))
        log.warning("shutdown deadline near: aborting the requests still running")
        engine.fail_all(shutting_down)

    app = build_app(service, keys, playground=args.playground)
    for collector in getattr(engine, "collectors", list)():   # the replicas' own series, on a cluster
        service.metrics.registry.register(collector)
    if args.playground:
        log.info("playground at http://%s:%d/", args.host, args.port)
    # The asyncio loop, even where uvloop is installed (ray[serve] brings it): the server's behaviour (its
    # timeouts, its shutdown) stays the one tested, whatever optional packages are present.
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                   loop="asyncio", http=protocol_with_header_timeout(limits.request_header_timeout),
                                   timeout_graceful_shutdown=args.shutdown_timeout))
    try:
        server.run()   # on SIGTERM/SIGINT: stop accepting, let requests finish up to --shutdown-timeout
    finally:
        engine.shutdown()   # aborts whatever is left
    return 0


def _serving_engine(args: argparse.Namespace, config: EngineConfig, limits: ServerLimits, single):
    """One engine in this process (`single`, i.e. AsyncEngine), or replicas on Ray Serve behind an adaptor."""
    options = cluster_options(args, limits)
    if options is None:
        return single(config=config)   # built on the engine thread, which alone runs torch
    from textcomplete.cluster import require_ray
    require_ray()   # before anything is loaded: a clear message naming the extra to install
    from textcomplete.cluster.launch import start_cluster
    return start_cluster(config, options)


def serve_settings(argv: list[str]):
    """`textcomplete serve` flags -> (args, API keys, limits, engine config, served model names)."""
    return _serve_settings(build_parser().parse_args(["serve", *argv]))


def _serve_settings(args: argparse.Namespace):
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("TEXTCOMPLETE_API_KEYS", "").split(",") if k.strip()]
    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
    config = _engine_config(args)
    return args, keys, limits, config, list(dict.fromkeys([args.served_model_name or config.model, config.model]))


def _bench_tokenizer(model: str):
    from textcomplete.models.gguf_file import GGUFFile
    from textcomplete.models.sources import resolve_source
    from textcomplete.tokenizer import Tokenizer
    path = resolve_source(model)
    if path.is_file():
        return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    import json
    return Tokenizer.from_hf_dir(path, json.loads((path / "config.json").read_text()))


def _workload_config(args: argparse.Namespace):
    from textcomplete.bench.workloads import WorkloadConfig
    return WorkloadConfig(concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                          prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                          scoring_requests=args.scoring_requests,
                          scoring_prompts_per_request=args.scoring_prompts_per_request,
                          shared_prefix_requests=args.shared_prefix_requests,
                          prefill_tokens=args.prefill_tokens)


def _cmd_bench(args: argparse.Namespace) -> int:
    from textcomplete.bench import workloads
    from textcomplete.bench.loadgen import LoadGenerator
    config = _workload_config(args)
    if args.compare:
        return _bench_compare(args, config)
    tokenizer = _bench_tokenizer(args.tokenizer_model)
    gen = LoadGenerator(args.base_url, args.model, api_key=args.api_key)
    chosen = tuple(w.strip().replace("-", "_") for w in args.workloads.split(","))
    if "prefix_groups" in chosen:   # several shared prefixes: what routing replicas by prefix is for
        from textcomplete.bench import prefix_groups
        groups = prefix_groups.PrefixGroupsConfig(
            groups=args.prefix_groups, requests_per_group=args.requests_per_prefix,
            prefix_tokens=config.shared_prefix_tokens, concurrency=args.prefix_concurrency)
        print(prefix_groups.run(args.base_url, args.model, args.api_key, tokenizer, groups).format())
        chosen = tuple(w for w in chosen if w != "prefix_groups")
    if chosen:
        results = workloads.run(gen, tokenizer, config, args.base_url, workloads=chosen)
        print(workloads.format_results(results))
    return 0


def _bench_compare(args: argparse.Namespace, config) -> int:
    import shlex
    from pathlib import Path

    from textcomplete.bench import bench_models, compare, llama_cpp_build, report
    chosen = bench_models.parse_models(args.models)
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    binaries = llama_cpp_build.ensure_built()
    docs = Path(args.output).parent
    logs = docs / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    models = [bench_models.prepare(name, fmt, binaries.quantize, Path(args.bench_models_dir).expanduser())
              for name, fmt in chosen]
    kernels_line = compare.build_native_kernels()
    print(kernels_line.removeprefix("- "))
    bandwidth = compare.measure_bandwidth()
    print(f"memory bandwidth: {bandwidth:.1f} GB/s")
    runs, skipped = [], []
    for model in models:
        tokenizer = _bench_tokenizer(str(model.path))
        tokens = compare.kv_tokens(max(config.concurrency), config)
        extra = shlex.split(args.serve_args)
        starts = [("textcomplete", compare.textcomplete_command(model, extra, tokens))]
        if args.int8_mode:
            starts.append(("textcomplete int8", compare.textcomplete_command(
                model, [*extra, "--activations", "int8"], tokens)))
        starts.append(("llama-server", compare.llama_server_command(
            binaries.server, model, 0, max(config.concurrency), tokens)))
        print(f"read {model.path.name} into the page cache in {compare.read_into_page_cache(model.path):.1f} s")
        done = compare.compare_servers(starts, model, config, tokenizer, logs, tokens, args.rounds, skipped)
        if done:
            runs.append(compare.ModelRun(model, done, *compare.file_figures(model)))
    given = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    command = "textcomplete bench --compare " + " ".join(shlex.quote(a) for a in given if a != "--compare")
    env = [*compare.environment_lines(binaries.version, compare.git_commit(Path(__file__).resolve().parent.parent)),
           kernels_line, "- before its servers started, each model's file was dropped from the page cache and read "
           "once from start to end: every server mapped the same warm cache"]
    path = report.write(Path(args.output), runs, bandwidth, env, command.strip(), config, args.note or [],
                        skipped)
    print(f"wrote {path}")
    return 0


def _http(args: argparse.Namespace):
    import httpx
    base = args.base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base.rstrip("/") + "/", headers=headers, timeout=600)


def _request_body(args: argparse.Namespace) -> dict:
    body = {"model": args.model, "prompt": args.prompt if len(args.prompt) != 1 else args.prompt[0]}
    for name in ("max_tokens", "temperature", "top_p", "n", "best_of", "logprobs", "presence_penalty",
                 "frequency_penalty", "seed", "suffix", "user"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.echo:
        body["echo"] = True
    if args.stop:
        body["stop"] = args.stop
    if args.logit_bias is not None:
        import json
        try:
            body["logit_bias"] = json.loads(args.logit_bias)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--logit-bias is not JSON: {exc}") from None
    if args.stream:
        body["stream"] = True
    return body


def _server_error(response) -> int:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    print(f"Error code: {response.status_code} - {message}", file=sys.stderr)
    return 1


def _cmd_completions_create(args: argparse.Namespace) -> int:
    import json
    body = _request_body(args)
    with _http(args) as http:
        if not args.stream:
            r = http.post("completions", json=body)
            if r.status_code != 200:
                return _server_error(r)
            print(json.dumps(r.json(), indent=2))
            return 0
        with http.stream("POST", "completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return _server_error(r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    print(f"\nError: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", []):
                    print(choice["text"], end="", flush=True)
            print()
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    import json
    with _http(args) as http:
        r = http.get("models")
        if r.status_code != 200:
            return _server_error(r)
        print(json.dumps(r.json(), indent=2))
    return 0


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None,
                        help="The server's /v1 URL (default: $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1).")
    parser.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY).")


def _number(text: str) -> int | float:
    """A number as the user wrote it: 5 stays an integer, 0.5 a float (so the server sees the same JSON)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_completion_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="ID of the model to use.")
    p.add_argument("--prompt", action="append", required=True,
                   help="The prompt; repeat for a batch of prompts.")
    p.add_argument("--max-tokens", type=int, default=None, help="Most tokens to generate (server default: 16).")
    p.add_argument("--temperature", type=_number, default=None, help="Sampling temperature, 0 to 2; 0 is greedy.")
    p.add_argument("--top-p", type=_number, default=None, help="Nucleus sampling mass, 0 to 1.")
    p.add_argument("--n", type=int, default=None, help="Completions per prompt.")
    p.add_argument("--best-of", type=int, default=None,
                   help="Candidates per prompt; the n with the best mean token log-probability are returned.")
    p.add_argument("--echo", action="store_true", help="Return the prompt before the completion.")
    p.add_argument("--logprobs", type=int, default=None, help="Log-probabilities of the top 0 to 5 tokens.")
    p.add_argument("--stop", action="append", default=None, help="A stop sequence; repeat for up to 4.")
    p.add_argument("--presence-penalty", type=_number, default=None, help="-2 to 2: penalise tokens already used.")
    p.add_argument("--frequency-penalty", type=_number, default=None, help="-2 to 2: penalise frequent tokens.")
    p.add_argument("--logit-bias", default=None, help='JSON map of token id to bias, e.g. \'{"50256": -100}\'.')
    p.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")
    p.add_argument("--suffix", default=None, help="Text after the insertion (fill in the middle).")
    p.add_argument("--stream", action="store_true", help="Print the text as it arrives.")
    p.add_argument("--user", default=None, help="An end-user id, passed through.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textcomplete", description="The OpenAI Completions API on open models.")
    parser.add_argument("--version", action="version", version=f"textcomplete {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    completions = commands.add_parser("completions", help="Talk to a server: create a completion.",
                                      description="The reference's command-line client for /v1/completions.")
    completion_commands = completions.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = completion_commands.add_parser("create", help="Create a completion and print it.",
                                            description="POST /v1/completions with one flag per request field; "
                                                        "prints the JSON response, or the text as it streams.")
    _add_completion_fields(create)
    _add_connection_options(create)
    create.set_defaults(handler=_cmd_completions_create)
    models = commands.add_parser("models", help="Talk to a server: list its models.")
    model_commands = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = model_commands.add_parser("list", help="List the served models.")
    _add_connection_options(listing)
    listing.set_defaults(handler=_cmd_models_list)

    serve = commands.add_parser("serve", help="Serve the OpenAI Completions API.",
                                description="Serve POST /v1/completions and GET /v1/models for one model.",
                                epilog=f"Model families: {families_text()}. Each loads from a Hugging Face "
                                       "directory or hub id (safetensors) or from a GGUF file.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    serve.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000).")
    serve.add_argument("--api-key", action="append", metavar="KEY",
                       help="A key clients must send as 'Authorization: Bearer KEY'; repeat for several. Also "
                            "read, comma-separated, from TEXTCOMPLETE_API_KEYS. With none, the server is open.")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="On SIGTERM/SIGINT, how long in-flight requests may finish before the rest are aborted "
                            "(default: 30).")
    serve.add_argument("--no-playground", dest="playground", action="store_false",
                       help="Do not serve the playground page at / and /playground.")
    serve.add_argument("--enable-fault-injection", action="store_true", help=argparse.SUPPRESS)  # for tests
    limits = serve.add_argument_group("limits")
    defaults = ServerLimits()
    limits.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests, metavar="N",
                        help="Engine requests (one per prompt and candidate) that may wait beyond those running; "
                             f"past it, requests get 429 with Retry-After (default: {defaults.max_queued_requests}).")
    limits.add_argument("--max-request-body", dest="max_request_body_bytes", type=parse_size,
                        default=defaults.max_request_body_bytes, metavar="SIZE",
                        help="Largest request body; larger ones get 413 "
                             f"(default: {defaults.max_request_body_bytes >> 20}MiB).")
    limits.add_argument("--request-body-timeout", type=float, default=defaults.request_body_timeout,
                        metavar="SECONDS", help="Time to receive a whole request body; slower ones get 408 "
                                                f"(default: {defaults.request_body_timeout:g}).")
    limits.add_argument("--request-header-timeout", type=float, default=defaults.request_header_timeout,
                        metavar="SECONDS", help="Time to receive a request's line and headers, from the connection "
                                                "opening or the request's first byte; slower clients get 408 and "
                                                f"are disconnected (default: {defaults.request_header_timeout:g}).")
    limits.add_argument("--max-prompts-per-request", type=int, default=defaults.max_prompts_per_request,
                        metavar="N", help=f"Most prompts in one request (default: {defaults.max_prompts_per_request}).")
    limits.add_argument("--max-sequences-per-request", type=int, default=defaults.max_sequences_per_request,
                        metavar="N", help="Most prompts x best_of (or n) in one request "
                                          f"(default: {defaults.max_sequences_per_request}).")
    limits.add_argument("--kv-overcommit", type=float, default=defaults.kv_overcommit, metavar="FACTOR",
                        help="Requests in flight may together need at most FACTOR times the KV cache's tokens (each "
                             "counted at its prompt plus max_tokens, or the context when max_tokens is null); past "
                             "it, requests get 429, and one that alone needs more gets 400. This bounds the memory "
                             f"requests take besides the cache (default: {defaults.kv_overcommit:g}).")
    limits.add_argument("--requests-per-minute", type=int, default=defaults.requests_per_minute, metavar="N",
                        help="Per API key: completion requests per minute; 0 for no limit (default: 0).")
    limits.add_argument("--tokens-per-minute", type=int, default=defaults.tokens_per_minute, metavar="N",
                        help="Per API key: prompt tokens plus the most completion tokens asked for, per minute; "
                             "0 for no limit (default: 0).")
    serve.add_argument("--served-model-name", default=None,
                       help="The model id clients use (default: the --model value).")
    add_cluster_arguments(serve)
    _add_engine_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    gen = commands.add_parser("generate", help="Complete one prompt from the command line.",
                              description="Load the model, complete one prompt and print the text.")
    gen.add_argument("--prompt", required=True, help="The text to complete.")
    gen.add_argument("--max-tokens", type=int, default=32, help="Most tokens to generate (default: 32).")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0).")
    gen.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1).")
    gen.add_argument("--seed-request", type=int, default=None, help="Seed of this request's sampling.")
    _add_engine_options(gen)
    gen.set_defaults(handler=_cmd_generate)

    load = commands.add_parser(
        "bench", help="Load-test an OpenAI-compatible completions server, or compare with llama.cpp's server.",
        description="Streamed requests at a sweep of concurrencies (output tokens/s, requests/s, time to first "
                    "token and inter-token latency), lm-eval style scoring and a shared-prefix workload, against "
                    "any server at --base-url; with --compare, against textcomplete and llama.cpp's llama-server "
                    "(built from source on first use, then cached) in turn on the same GGUF files, writing "
                    "docs/benchmarks.md.")
    load.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="The server's /v1 URL.")
    load.add_argument("--model", default="SmolLM2-135M-Instruct", help="Model id to request.")
    load.add_argument("--api-key", default="bench", help="Bearer key to send.")
    load.add_argument("--tokenizer-model", default="SmolLM2-135M-Instruct",
                      help="Model whose tokenizer cuts prompts to exact token counts (default: the default model).")
    load.add_argument("--workloads", default="single,sweep,scoring,shared-prefix",
                      help="Which workloads to run: single, sweep, scoring, shared-prefix, prefix-groups "
                           "(default: the first four).")
    load.add_argument("--concurrency", default="1,4,16,64", help="Concurrency sweep (default: 1,4,16,64).")
    load.add_argument("--prompt-tokens", type=int, default=128, help="Prompt length (default: 128).")
    load.add_argument("--output-tokens", type=int, default=128, help="Output length (default: 128).")
    load.add_argument("--scoring-requests", type=int, default=4, help="Scoring requests (default: 4).")
    load.add_argument("--scoring-prompts-per-request", type=int, default=8,
                      help="Prompts per scoring request; 1 for servers that take one prompt (default: 8).")
    load.add_argument("--shared-prefix-requests", type=int, default=32,
                      help="Requests sharing one 512-token prefix (default: 32).")
    load.add_argument("--prefix-groups", type=int, default=12,
                      help="prefix-groups workload (not in the default set): distinct 512-token prefixes "
                           "(default: 12).")
    load.add_argument("--requests-per-prefix", type=int, default=6,
                      help="prefix-groups workload: requests sharing each prefix, in shuffled order (default: 6).")
    load.add_argument("--prefix-concurrency", type=int, default=4,
                      help="prefix-groups workload: requests in flight (default: 4).")
    load.add_argument("--prefill-tokens", type=int, default=512,
                      help="Prompt length of the prefill workload (default: 512).")
    load.add_argument("--compare", action="store_true",
                      help="Run single stream, the sweep and prefill against textcomplete and llama-server, "
                           "and write the report.")
    load.add_argument("--models", default="smollm2-135m:Q4_1",
                      help="With --compare, comma-separated NAME:FORMAT: smollm2-135m:Q4_1 (the shipped file), "
                           "smollm2-1.7b or llama3-8b with Q4_K_M, Q8_0 or F16 (random weights at the real "
                           "shape, written and quantized on first use; default: smollm2-135m:Q4_1).")
    load.add_argument("--rounds", type=int, default=3,
                      help="With --compare, how many times each server runs the workloads, the servers taking "
                           "turns in each round; the report gives each server's median round (default: 3).")
    load.add_argument("--int8-mode", action=argparse.BooleanOptionalAction, default=True,
                      help="With --compare, also run textcomplete with --activations int8 (default: on).")
    load.add_argument("--bench-models-dir", default="~/.cache/textcomplete/bench-models",
                      help="Where --compare caches the random-weight GGUF files.")
    load.add_argument("--serve-args", default="",
                      help="Extra options for textcomplete serve in --compare (its threads and KV cache are set "
                           "to match llama-server's).")
    load.add_argument("--output", default="docs/benchmarks.md",
                      help="Where --compare writes its report; its plots and server logs go beside it, so give "
                           "each run a directory of its own (default: docs/benchmarks.md).")
    load.add_argument("--note", action="append", help="A line for the report's notes (repeatable).")
    load.set_defaults(handler=_cmd_bench)

    bench = commands.add_parser("bench-engine", help="Measure the engine's decode and prefill throughput.",
                                description="Decode tokens/s at several batch sizes and the prefill tokens/s "
                                            "of one long prompt, measured in-process.")
    bench.add_argument("--batch-sizes", default="1,16", help="Comma-separated decode batch sizes (default: 1,16).")
    bench.add_argument("--decode-steps", type=int, default=64, help="Decode steps timed per batch size (default: 64).")
    bench.add_argument("--prompt-len", type=int, default=512, help="Prefill prompt length (default: 512).")
    bench.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                       help="Also time 32 requests sharing a 512-token prefix, with and without prefix caching.")
    _add_engine_options(bench)
    bench.set_defaults(handler=_cmd_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per request drowns the progress bars
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"textcomplete: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # httpx's transport errors are not OSErrors; see below
        print(f"textcomplete: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__module__.startswith("httpx"):
            print(f"textcomplete: error: cannot talk to the server: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
