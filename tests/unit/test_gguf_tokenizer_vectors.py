"""llama.cpp's tokenizer test vectors: every vocabulary of type gpt2 (byte-level BPE) or llama (SentencePiece)
that ships them must give exactly the expected ids for every text, and decode back to the text.

The vectors are the `vendor/llama.cpp/models/ggml-vocab-*.gguf{,.inp,.out}` files of the llama-cpp-python 0.3.36
source distribution on PyPI, downloaded once into the cache (TEXTCOMPLETE_CACHE, default ~/.cache/textcomplete).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from textcomplete.api.text import ChoiceText, stable_prefix
from textcomplete.models.gguf_file import read_layout
from textcomplete.tokenizer import Tokenizer

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("TEXTCOMPLETE_CACHE", Path.home() / ".cache" / "textcomplete")) / "llama-cpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"
# The vocabularies of 0.3.36 with vectors and a tokenizer type this project builds (bert, t5 and gemma4's own
# model are not: the test below checks that they are refused by name).
VOCABS = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "mpt",
          "phi-3", "qwen2", "qwen35", "refact", "starcoder"]


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    models = CACHE / "models"
    if not (models / "ggml-vocab-gpt-2.gguf.out").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        archives = list(CACHE.glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                  "--dest", str(CACHE), SDIST], capture_output=True, text=True, timeout=1200)
            archives = list(CACHE.glob("llama_cpp_python-*.tar.gz"))
            if run.returncode != 0 or not archives:
                pytest.skip(f"could not download the {SDIST} source distribution (its llama.cpp tokenizer vectors): "
                            f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        partial = CACHE / "models.partial"
        partial.mkdir(exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if "/vendor/llama.cpp/models/ggml-vocab-" in member.name and member.isfile():
                    member.name = Path(member.name).name
                    tar.extract(member, partial, filter="data")
        partial.rename(models)
    return models


def cases(directory: Path, name: str) -> list[tuple[str, list[int]]]:
    base = directory / f"ggml-vocab-{name}.gguf"
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    texts[-1] = texts[-1].removesuffix("\n")
    expected = [[int(t) for t in line.split()] for line in Path(f"{base}.out").read_text().split("\n")]
    assert len(expected) >= len(texts)
    return list(zip(texts, expected))


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_tokenizer_vectors(vocab_dir, name):
    metadata, _ = read_layout(vocab_dir / f"ggml-vocab-{name}.gguf")
    assert metadata["tokenizer.ggml.model"] in ("gpt2", "llama")
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    wrong = []
    for text, ids in cases(vocab_dir, name):
        got = tokenizer.encode(text, add_special_tokens=False)   # as llama.cpp's test: no BOS
        if got != ids:
            wrong.append((text, ids, got))
        assert tokenizer.decode(got) == text, (text, got)
    assert not wrong, f"{len(wrong)} texts tokenized differently, e.g. {wrong[:2]}"


def test_every_vocabulary_with_vectors_is_covered(vocab_dir):
    """A new release's vectors of a buildable type are not silently left out of the list above."""
    with_vectors = {p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in vocab_dir.glob("ggml-vocab-*.gguf.inp")}
    buildable = {name for name in with_vectors
                 if read_layout(vocab_dir / f"ggml-vocab-{name}.gguf")[0]["tokenizer.ggml.model"] in ("gpt2", "llama")}
    assert buildable == set(VOCABS)


def test_unsupported_tokenizer_types_are_named(vocab_dir):
    metadata, _ = read_layout(vocab_dir / "ggml-vocab-bert-bge.gguf")
    with pytest.raises(ValueError, match=r"'bert' is not supported \(supported: gpt2 .*llama"):
        Tokenizer.from_gguf_metadata(metadata)


def test_sentencepiece_begins_with_bos_and_keeps_special_tokens_whole(vocab_dir):
    metadata, _ = read_layout(vocab_dir / "ggml-vocab-llama-spm.gguf")
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    ids = tokenizer.encode("Hello</s> world")
    assert ids[0] == metadata["tokenizer.ggml.bos_token_id"]
    assert metadata["tokenizer.ggml.eos_token_id"] in ids     # the special token, not its characters
    assert tokenizer.decode(tokenizer.encode("\n\n<0x0A> x", add_special_tokens=False)) == "\n\n<0x0A> x"


def _reference_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """What a choice's text must be after each token: every token decoded at once, without a trailing
    unfinished character, never shorter than before."""
    texts, text = [], ""
    for end in range(1, len(ids) + 1):
        decoded = stable_prefix(tokenizer.decode(ids[:end], skip_special_tokens=True))
        text = decoded if len(decoded) >= len(text) else text
        texts.append(text)
    return texts


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "phi-3", "qwen2"])
def test_windowed_detokenizing_equals_decoding_every_token_at_once(vocab_dir, name):
    """ChoiceText decodes a few tokens a step; after every token its text is the whole decode's, on the
    vectors' multilingual texts (multi-byte characters split over tokens) and on random ids (byte tokens that
    never finish a character, special tokens that are skipped)."""
    metadata, _ = read_layout(vocab_dir / f"ggml-vocab-{name}.gguf")
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    rng = random.Random(name)
    texts = [text for text, _ in cases(vocab_dir, name)]
    sequences = [tokenizer.encode("".join(texts)[:3000], add_special_tokens=False)]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(300)] for _ in range(3)]
    for ids in sequences:
        choice = ChoiceText(tokenizer, [])
        got = []
        for token in ids:
            choice.add([token])
            got.append(choice.text)
        want = _reference_texts(tokenizer, ids)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first is None, f"after token {first}: {got[first][-40:]!r} != {want[first][-40:]!r}"
        assert choice.token_starts == [0] + [len(t) for t in want[:-1]]
