"""The tokenizer wrapper: text <-> token ids over Hugging Face `tokenizers`, from tokenizer.json or GGUF.

It also knows the model's special ids (BOS, end-of-text), which the engine uses to stop.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from textcomplete.errors import ModelFileError

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
        """Build the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata: byte-level BPE
        (`gpt2`) or SentencePiece BPE with byte fallback (`llama`)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in _GGUF_TOKENIZERS:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: "
                             f"{', '.join(f'{k} ({v})' for k, v in _GGUF_TOKENIZERS.items())})")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or []
        backend = _byte_level_bpe(meta, tokens) if kind == "gpt2" else _sentencepiece_bpe(meta, tokens, types)
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t in _CONTROL_TOKEN_TYPES]
        backend.add_special_tokens(special)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = _as_id_list(meta.get("tokenizer.ggml.eos_token_id"))
        eos += _as_id_list(meta.get("tokenizer.ggml.eot_token_id"))
        # llama.cpp's default: SentencePiece vocabularies begin with BOS unless the file says otherwise
        if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
        return cls(backend, bos, tuple(dict.fromkeys(eos)))


_GGUF_TOKENIZERS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}
_BYTE_TOKEN_TYPE = 6    # <0xXX>: a raw byte, for text no other token covers
_SPACE = "\u2581"       # SentencePiece's visible space


def _byte_level_bpe(meta: dict, tokens: list[str]) -> HFTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre_tokenizer, whole_words = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
    backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=whole_words))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]) -> HFTokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become U+2581 (one is prepended unless the file sets
    add_space_prefix false), adjacent pieces merge highest score first, and text no piece covers falls
    back to <0xXX> byte tokens. Expressed as `tokenizers` BPE: a merge for every way a vocabulary piece
    splits into two others, ranked by the merged piece's score."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    ranked = []
    for i, piece in enumerate(tokens):
        if (types[i] if i < len(types) else 1) == _BYTE_TOKEN_TYPE or len(piece) < 2 or vocab[piece] != i:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((scores[i], pair) for pair in splits)
    ranked.sort(key=lambda entry: -entry[0])   # stable: equal scores keep vocabulary order
    merges = [pair for _, pair in ranked]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(models.BPE(vocab, merges, unk_token=tokens[unk] if unk is not None else None,
                                     fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # A normalizer runs on each stretch of text between special tokens: llama.cpp prepends the space there too.
    backend.normalizer = normalizers.Sequence([*([normalizers.Prepend(_SPACE)] if prefix else []),
                                               normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(content=" ", left=1, right=0)] if prefix else [])])
    return backend


# How each `tokenizer.ggml.pre` value splits text before byte-level BPE: the regular expressions llama.cpp
# applies in turn (each one isolating its matches within the pieces the previous ones left), transcribed
# from its vocabulary loader (src/llama-vocab.cpp), and whether whole words in the vocabulary skip the merges.
_SPLIT_RULES: dict[str, tuple[str, ...]] = {
    'llama3': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'dbrx': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'deepseek_llm': (
        '[\r\n]',
        '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
        '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
        '\\s+$',
        '[一-龥ࠀ-一가-\ud7ff]+',
        '\\p{N}+',
    ),
    'deepseek3_llm': (
        '\\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
    ),
    'deepseek_coder': (
        '[\r\n]',
        '\\s?\\p{L}+',
        '\\s?\\p{P}+',
        '[一-龥ࠀ-一가-\ud7ff]+',
        '\\p{N}',
    ),
    'falcon': (
        '[\\p{P}\\$\\+<=>\\^~\\|`]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '[0-9][0-9][0-9]',
    ),
    'starcoder': (
        '\\p{N}',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    'gpt2': (
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    'qwen2': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'qwen35': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'bloom': (
        ' ?[^(\\s|.,!?…。，、।۔،)]+',
    ),
    'chatglm4': (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'viking': (
        ' ?[^(\\s|.,!?…。，、।۔،)]+',
        '\\p{N}',
    ),
    'tekken': (
        '[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    'gpt4o': (
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ),
    'default': (
        '[\\p{P}\\$\\+<=>\\^~\\|]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '\\p{N}+',
        '[0-9][0-9][0-9]',
    ),
}

# `tokenizer.ggml.pre` names -> (their rules, whether a piece that is itself in the vocabulary is taken whole).
_PRE_TYPES: dict[str, tuple[str, bool]] = {
    **{name: ("llama3", True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                          "midm-2.0", "lfm2")},
    "dbrx": ("dbrx", False), "smaug-bpe": ("dbrx", False),
    "deepseek-llm": ("deepseek_llm", False), "deepseek-v3": ("deepseek3_llm", False),
    "deepseek-coder": ("deepseek_coder", False), "falcon": ("falcon", False),
    **{name: ("starcoder", False) for name in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                               "minerva-7b")},
    **{name: ("gpt2", False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de",
                                          "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe",
                                          "gigachat", "trillion", "mellum")},
    **{name: ("qwen2", False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan")},
    "qwen35": ("qwen35", False),
    **{name: ("bloom", False) for name in ("bloom", "poro-chat", "gpt3-finnish")},
    "chatglm-bpe": ("chatglm4", False), "glm4": ("chatglm4", True), "viking": ("viking", False),
    "tekken": ("tekken", True), "gpt-4o": ("gpt4o", False), "default": ("default", False),
}


def _gguf_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The split before byte-level BPE for a `tokenizer.ggml.pre` value, and its ignore-merges flag."""
    if pre not in _PRE_TYPES:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TYPES))})")
    rules, whole_words = _PRE_TYPES[pre]
    splits = [pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False) for rule in _SPLIT_RULES[rules]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), \
        whole_words


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
