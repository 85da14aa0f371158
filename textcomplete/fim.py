"""Fill-in-the-middle: which insertion format a tokenizer was trained with, and the prompt it expects.

A model can insert when its vocabulary carries one of the known FIM token sets. The prompt is built in
the order the family was trained with, and generation stops at the family's end-of-middle tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from textcomplete.tokenizer import Tokenizer


@dataclass(frozen=True)
class FimFamily:
    name: str
    prefix: str
    suffix: str
    middle: str | None        # None: the prompt ends with the prefix (suffix-prefix order)
    suffix_first: bool         # trained as suffix-prefix-middle rather than prefix-suffix-middle
    stops: tuple[str, ...]    # tokens that end the middle, where the vocabulary has them

    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.prefix, self.suffix, self.middle) if t is not None)


FAMILIES = (
    FimFamily("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", False,
              ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")),
    FimFamily("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", False,
              ("<|endoftext|>", "<file_sep>", "<fim_pad>")),
    FimFamily("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", False, ("▁<EOT>",)),
    FimFamily("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", False, ("<|EOT|>",)),
    FimFamily("codestral", "[PREFIX]", "[SUFFIX]", None, True, ()),
)


@dataclass(frozen=True)
class FimPrompt:
    token_ids: list[int]       # what the engine receives
    prefix_span: tuple[int, int]  # where the caller's prompt (the prefix) lies within it


@dataclass(frozen=True)
class FimTemplate:
    family: FimFamily
    ids: dict[str, int]        # FIM token -> id
    bos: list[int]             # [bos] when the tokenizer starts sequences with it
    stop_token_ids: tuple[int, ...]

    def build(self, prefix: list[int], suffix: list[int]) -> FimPrompt:
        f = self.family
        if f.suffix_first:
            head = self.bos + [self.ids[f.suffix]] + suffix + [self.ids[f.prefix]]
            tail = [self.ids[f.middle]] if f.middle else []
            return FimPrompt(head + prefix + tail, (len(head), len(head) + len(prefix)))
        head = self.bos + [self.ids[f.prefix]]
        ids = head + prefix + [self.ids[f.suffix]] + suffix + [self.ids[f.middle]]
        return FimPrompt(ids, (len(head), len(head) + len(prefix)))


def detect_fim(tokenizer: Tokenizer) -> FimTemplate | None:
    """The first family whose FIM tokens are all in the vocabulary, or None: this model cannot insert."""
    vocab = tokenizer.backend
    for family in FAMILIES:
        ids = {t: vocab.token_to_id(t) for t in family.tokens()}
        if any(i is None for i in ids.values()):
            continue
        stops = tuple(i for i in (vocab.token_to_id(t) for t in family.stops) if i is not None)
        starts_with_bos = tokenizer.bos_token_id is not None and \
            tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]
        return FimTemplate(family, ids, [tokenizer.bos_token_id] if starts_with_bos else [], stops)
    return None
