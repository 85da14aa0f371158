"""The synchronous engine: add requests, step, abort. Owns every request, the scheduler and the runner.

One step = schedule -> run the model -> apply results to requests -> hand out `RequestOutput`s.
The async wrapper in `async_engine.py` runs this loop on its own thread.

The model runs on one of two backends (EngineConfig.backend): the native library without torch
(native_runner.py, for the dense Llama-family GGUF files its kernels run), or PyTorch modules (runner.py, every
model). torch is imported only for the second.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textcomplete.config import EngineConfig
from textcomplete.engine.block_manager import BlockAllocator
from textcomplete.engine.fingerprint import system_fingerprint
from textcomplete.engine.outputs import EngineStats, RequestOutput
from textcomplete.engine.request import Request
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.engine.scheduler import Scheduler
from textcomplete.engine.step_results import ChunkResult
from textcomplete.kernels import DIRECT_ROWS
from textcomplete.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

    from textcomplete.models.loader import LoadedModel
    from textcomplete.models.native_llama import NativeLlama

log = logging.getLogger(__name__)

_ITEMSIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


# Allocations below this come from the heap and go back to it; freed memory at the heap's top is kept up to it.
STEP_MEMORY_REUSE = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
# A step that computes at least this many prompt tokens gives the heap's free pages back when it ends.
RELEASE_AFTER_PROMPT_TOKENS = 64


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def reuse_freed_memory(limit: int = STEP_MEMORY_REUSE) -> bool:
    """Keep memory that steps free for the steps after them. A step allocates and frees the same temporaries
    each time: a prefill chunk's activations are megabytes a layer. glibc maps each allocation above its mmap
    threshold (at most 32 MiB, and at first 128 KiB) afresh and unmaps it when freed, so every step faults
    its pages in again and the kernel zeroes them: on a 1.7B model on two threads, ~110K page faults and 0.3 s
    of system CPU in each 130-token prefill. Returns whether the C library took the setting (glibc does)."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def release_freed_memory() -> bool:
    """Give the free pages inside the heaps back to the system (glibc's malloc_trim), for after a step that
    computed prompt chunks. Their temporaries come in sizes that change with the chunk, and the small
    allocations that outlive a step settle between them, so a heap that keeps what steps free grows well past
    what any one step holds at once: after a 512-token prefill of a 1.7B model the heap held 174 MiB free
    beside 105 MiB in use, while the step itself never had more than 60 MiB live. Decode steps repeat the
    same sizes, reuse their memory as it is, and are not followed by this: they are short, and would fault
    their temporaries in again each time. Returns whether the C library has the call."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def freeze_loaded_objects() -> None:
    """For a process that serves one engine for its whole life, once the engine is built: the loaded model,
    tokenizer and engine are moved out of the garbage collector's sight, so that its full collections, which
    stop the engine thread too, no longer walk them (about 90 ms each with a 1.7B model loaded, against
    nothing after this). Not for an engine inside someone else's program: it would freeze their objects too."""
    gc.collect()
    gc.freeze()


def resolve_device_and_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    import torch

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, itemsize: int) -> int:
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def native_model(config: EngineConfig) -> NativeLlama | None:
    """The model of `config` on the native backend, or None where it takes torch (with backend "native", a
    ValueError saying why not instead)."""
    if config.backend == "torch":
        return None
    from textcomplete.models.sources import resolve_source

    reason = _native_settings_reason(config)
    path = resolve_source(config.model) if reason is None else None
    if reason is None and (not path.is_file() or path.suffix != ".gguf"):
        reason = "the model is not a GGUF file"
    library = None
    if reason is None:
        from textcomplete.kernels import library as native_library

        library = native_library.load()
        reason = "the native library could not be built (see the warning above)" if library is None else None
    if reason is None:
        from textcomplete.models.gguf_file import GGUFFile
        from textcomplete.models.native_llama import NativeLlama, unsupported_reason

        gguf = GGUFFile(path)
        reason = unsupported_reason(gguf, library)
        if reason is None:
            return NativeLlama(gguf, library)
    if config.backend == "native":
        raise ValueError(f"the native backend cannot serve {config.model}: {reason}")
    log.info("PyTorch backend: the native one does not serve %s (%s)", config.model, reason)
    return None


def _native_settings_reason(config: EngineConfig) -> str | None:
    """Why settings alone rule out the native backend (None: they do not)."""
    if config.device not in ("auto", "cpu") or (config.device == "auto" and Path("/proc/driver/nvidia").exists()):
        return "it runs on the CPU only"
    if config.dtype not in ("auto", "float32"):
        return "its activations are float32"
    if not config.stored_weights:
        return "it runs the weights as stored"
    if not config.native_decode:
        return "--no-native-decode asks for PyTorch operators"
    return None


KV_SHARE_OF_AVAILABLE = 0.25   # the default KV budget: this share of the memory available at start
_MIN_DEFAULT_KV = 64 << 20


def default_kv_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """A quarter of the memory the system reports available (MemAvailable, which counts reclaimable page
    cache: a mapped model file's pages among them), at least 64 MiB; 2 GiB where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(_MIN_DEFAULT_KV, int(int(line.split()[1]) * 1024 * KV_SHARE_OF_AVAILABLE))
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 30


def check_request_limits(prompt_token_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int,
                         num_blocks: int, block_size: int) -> None:
    """ValueError if a request could never run on an engine of these fixed sizes (also used by the cluster
    front end, which holds only the replicas' sizes)."""
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    bad = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"logit_bias token id {bad} is outside the vocabulary (0..{vocab - 1})")
    wanted = len(prompt_token_ids) + (params.max_tokens or 0)
    if wanted > max_model_len:
        raise ValueError(f"{wanted} tokens exceed the context length {max_model_len}")
    most = min(len(prompt_token_ids) + (params.max_tokens if params.max_tokens is not None else max_model_len),
               max_model_len)
    if -(-most // block_size) > num_blocks:
        raise ValueError(f"a request of {most} tokens does not fit in the KV cache ({num_blocks * block_size} tokens)")


class LLMEngine:
    """`loaded`: a model already loaded with torch, to run on the PyTorch backend (else `config` says what to
    load and where)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        native = native_model(config) if loaded is None else None
        if native is None and config.threads:   # before loading: the loader's work runs on them too
            import torch

            torch.set_num_threads(config.threads)
        self.loaded = None if native is not None else loaded if loaded is not None else self._load_torch_model()
        self.backend = "native" if native is not None else "torch"
        reuse_freed_memory()   # after loading: what the steps free, later steps reuse
        spec = native.spec if native is not None else self.loaded.spec
        self.spec, self.tokenizer = spec, native.tokenizer if native is not None else self.loaded.tokenizer
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        model_dtype = "float32" if native is not None else str(self.loaded.dtype).removeprefix("torch.")
        kv_dtype = model_dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
        kv_memory = config.kv_cache_memory or default_kv_memory()
        num_blocks = kv_memory // kv_bytes_per_block(spec, config.block_size, _ITEMSIZES[kv_dtype])
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.max_num_batched_tokens, config.max_num_seqs)
        if native is not None:
            self.runner = self._native_runner(native, num_blocks, kv_dtype)
            path, device, runtime = native.path, "cpu", "native"
        else:
            self.runner = self._torch_runner(num_blocks, kv_dtype)
            import torch

            path, device, runtime = self.loaded.path, self.loaded.device.type, f"torch={torch.__version__}"
        self.model_path = path   # the file or directory the weights came from
        self.description = f"{config.model} ({self.backend} backend, {model_dtype}, KV cache {kv_dtype})"
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.fingerprint = system_fingerprint(path, model_dtype, kv_dtype, device, runtime, config)
        log.info("KV cache: %d blocks of %d tokens (%d tokens); context %d; %s backend", num_blocks,
                 config.block_size, num_blocks * config.block_size, self.max_model_len, self.backend)

    def _load_torch_model(self) -> LoadedModel:
        from textcomplete.models.loader import load_model

        device, dtype = resolve_device_and_dtype(self.config)
        return load_model(self.config.model, dtype, device, stored=self.config.stored_weights)

    def _native_runner(self, model: NativeLlama, num_blocks: int, kv_dtype: str):
        from textcomplete.engine.native_runner import NativeRunner

        if self.config.threads:
            model.library.set_num_threads(self.config.threads)
        model.set_context_length(self.max_model_len)
        int8 = self.config.activations == "int8" and model.library.int8_available()
        if int8:
            log.info("8-bit activations in the products of the stored matrices whose formats take them")
        return NativeRunner(model, num_blocks, self.config.block_size, kv_dtype, DIRECT_ROWS, self.config.seed, int8)

    def _torch_runner(self, num_blocks: int, kv_dtype: str):
        import torch

        from textcomplete.engine.runner import ModelRunner
        from textcomplete.kernels import decode_layers
        from textcomplete.models.layers import PagedAttention
        from textcomplete.quant.linear import use_int8_activations

        config, loaded = self.config, self.loaded
        if config.activations == "int8":
            log.info("8-bit activations in the products of %d stored linear layers",
                     use_int8_activations(loaded.model))
        if hasattr(loaded.model, "set_context_length"):   # rope scalings that depend on the served context
            loaded.model.set_context_length(self.max_model_len)
        runner = ModelRunner(loaded.model, loaded.spec, num_blocks, config.block_size, getattr(torch, kv_dtype),
                             loaded.device, config.seed)
        native = config.native_decode and loaded.device.type == "cpu" and loaded.dtype == torch.float32
        kernels = decode_layers() if native else None
        for attn in (m for m in loaded.model.modules() if isinstance(m, PagedAttention)):
            attn.native = kernels
        if hasattr(loaded.model, "use_native_decode"):
            loaded.model.use_native_decode(kernels)
        return runner

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError if it can never run (bad ids, too long, larger than the cache)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        request = Request(request_id, prompt_token_ids, params, next(self._arrivals))
        self.requests[request_id] = request
        self.scheduler.add(request)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError if the request can never run. Reads only fixed settings, so any thread may call it."""
        check_request_limits(prompt_token_ids, params, self.spec.vocab_size, self.max_model_len,
                             self.allocator.num_blocks, self.allocator.block_size)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.remove(request)
        request.finish_reason = "abort"
        return RequestOutput(request_id, (), finished=True, finish_reason="abort",
                             num_prompt_tokens=request.prompt_len)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        a, s = self.allocator, self.scheduler
        return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_blocks_total=a.num_blocks,
                           kv_blocks_used=a.num_used_blocks, kv_blocks_free=a.num_free_blocks,
                           kv_blocks_cached=a.num_cached_blocks, prefix_cache_queried_tokens=s.prompt_tokens_looked_up,
                           prefix_cache_hit_tokens=s.prompt_tokens_cached, preemptions=s.num_preemptions,
                           prefix_cache_evictions=a.num_evictions)

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        outputs = [out for result in self.runner.execute(sched) if (out := self._apply(result)) is not None]
        if sched.num_prompt_tokens >= RELEASE_AFTER_PROMPT_TOKENS:
            release_freed_memory()
        return outputs

    def _apply(self, result: ChunkResult) -> RequestOutput | None:
        chunk, request = result.chunk, result.chunk.request
        completes = chunk.completes_sequence   # judged before the new token lengthens the sequence
        request.num_computed_tokens = chunk.end
        self.allocator.cache_full_blocks(request)
        request.next_prompt_logprob_pos += len(result.prompt_logprobs)
        new_tokens = ()
        if result.error is not None:   # this request alone failed (e.g. in sampling): end it, keep the rest
            request.finish_reason = "error"
        elif result.token_id is not None:
            request.token_ids.append(result.token_id)
            new_tokens = (result.token_id,)
        if completes and request.finish_reason is None:
            request.finish_reason = self._finish_reason(request)
        if not new_tokens and not result.prompt_logprobs and request.finish_reason is None:
            return None   # a prompt chunk with nothing to report yet
        if request.finish_reason is not None:
            self.requests.pop(request.request_id, None)
            self.scheduler.remove(request)
        return RequestOutput(
            request.request_id, new_tokens,
            logprobs=(result.logprob,) if result.logprob is not None else (),
            prompt_logprobs=tuple(result.prompt_logprobs),
            finished=request.finish_reason is not None, finish_reason=request.finish_reason,
            num_prompt_tokens=request.prompt_len, num_cached_tokens=request.num_cached_tokens or 0,
            error=result.error)

    def _finish_reason(self, request: Request) -> str | None:
        params = request.params
        if params.max_tokens == 0:
            return "length"
        last = request.token_ids[-1]
        if not params.ignore_eos and last in self.eos_token_ids or last in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return "length"
        if request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[RequestOutput]]:
        """Run prompts to completion, all at once; returns each request's outputs in order (for tests, tools)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        collected: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while any(not outs or not outs[-1].finished for outs in collected.values()):
            for out in self.step():
                collected[out.request_id].append(out)
        return [collected[rid] for rid in ids]
