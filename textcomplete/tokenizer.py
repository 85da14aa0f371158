"""The tokenizer wrapper: text <-> token ids over Hugging Face `tokenizers`, from tokenizer.json or GGUF.

It also knows the model's special ids (BOS, end-of-text), which the engine uses to stop.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from textcomplete.errors import ModelFileError

# Pre-tokenizer split patterns of GGUF `tokenizer.ggml.pre` values (as llama.cpp names them).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_PATTERNS = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "smaug-bpe": _LLAMA3_PATTERN,
                 "qwen2": _QWEN2_PATTERN, "deepseek-r1-qwen": _QWEN2_PATTERN}
_CONTROL_TOKEN_TYPES = (3, 4)   # GGUF token types CONTROL and USER_DEFINED: never split by BPE


END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """Encodes text to ids and back; `eos_token_ids` are the ids that end a generation.

    Besides the model's own end token (first), a special `<|endoftext|>` token also ends a generation:
    in a completions API it marks the end of the document whatever the chat turn token is.
    """

    def __init__(self, backend: HFTokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        end_of_text = backend.token_to_id(END_OF_TEXT)
        if end_of_text is not None and any(t.content == END_OF_TEXT and t.special
                                           for t in backend.get_added_tokens_decoder().values()):
            eos_token_ids = tuple(dict.fromkeys((*eos_token_ids, end_of_text)))
        self.eos_token_ids = eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @classmethod
    def from_hf_dir(cls, directory: Path, model_config: dict) -> "Tokenizer":
        """tokenizer.json, with special ids from tokenizer_config.json and generation_config.json."""
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelFileError(directory, "no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:   # noqa: BLE001 - the library's own error type: a damaged tokenizer.json
            raise ModelFileError(path, f"not a readable tokenizer ({exc})") from None
        tok_cfg = _read_json(directory / "tokenizer_config.json")
        gen_cfg = _read_json(directory / "generation_config.json")
        eos: list[int] = []
        for source in (gen_cfg.get("eos_token_id"), model_config.get("eos_token_id")):
            eos.extend(_as_id_list(source))
        eos_text = _token_text(tok_cfg.get("eos_token"))
        if eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos.append(backend.token_to_id(eos_text))
        bos = model_config.get("bos_token_id")
        bos_text = _token_text(tok_cfg.get("bos_token"))
        if bos is None and bos_text is not None:
            bos = backend.token_to_id(bos_text)
        return cls(backend, bos, tuple(dict.fromkeys(eos)))

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t in _CONTROL_TOKEN_TYPES]
        backend.add_special_tokens(special)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = _as_id_list(meta.get("tokenizer.ggml.eos_token_id"))
        eos += _as_id_list(meta.get("tokenizer.ggml.eot_token_id"))
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
        return cls(backend, bos, tuple(dict.fromkeys(eos)))


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_PATTERNS)
    if pre in _PRE_PATTERNS:
        split = pre_tokenizers.Split(Regex(_PRE_PATTERNS[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, byte_level])
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level   # "gpt2", "default" and the rest: GPT-2's own split


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
