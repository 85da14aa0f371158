"""Tiny random-weight models in Hugging Face format, built by the tests themselves.

Each is saved with `save_pretrained` plus a word-level tokenizer.json, so the engine loads it through
the same path as a real checkpoint, and `transformers` can serve as the reference on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384
EOS_ID = 1


def _config(arch: str, **overrides):
    import transformers as tf
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=EOS_ID, initializer_range=0.2)
    if overrides:
        return {"llama": tf.LlamaConfig}[arch](max_position_embeddings=512, **common, **overrides)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                              rope_theta=10000.0, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0,
                              tie_word_embeddings=True, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                              tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {"<s>": 0, "</s>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(2, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def make_tiny_model(arch: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Build, randomly initialise and save a tiny `arch` model (float32) into `directory`."""
    return save_tiny_model(_config(arch, **overrides), directory, seed)


def tiny_config_kwargs(**overrides) -> dict:
    """The settings every tiny test model shares (vocabulary, special ids, initial weight scale)."""
    return dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=EOS_ID, initializer_range=0.2, **overrides)


def save_tiny_model(config, directory: Path, seed: int = 0) -> Path:
    """Randomly initialise a transformers model of `config` (float32), perturb its norms and biases, and save it
    with the tiny tokenizer: the engine loads it like a real checkpoint, transformers is the reference."""
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():   # make norms and biases non-trivial too, so loading them wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


def reference_logprobs(directory: Path, token_ids: list[int]) -> torch.Tensor:
    """Hugging Face transformers' log-softmax over the vocabulary at every position: [len, vocab]."""
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
