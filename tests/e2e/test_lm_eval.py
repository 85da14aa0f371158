"""lm-evaluation-harness against the server, offline: its scores equal those computed with transformers.

Runs `lm_eval --model local-completions` with the remote tokenizer on two local tasks: a multiple-choice
task (loglikelihood requests: token-array prompts, echo, max_tokens 1, logprobs 1) and a generate-until
task (greedy generation with stop sequences). The reference scores come from transformers on the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import CONTEXT
from tests.e2e.helpers import MODEL

TASKS = Path(__file__).parent / "lm_eval_tasks"


def lm_eval_command(base: str, include: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model={MODEL},base_url={base}/v1/completions,num_concurrent=1,max_retries=1,"
                            f"tokenizer_backend=remote,max_length={CONTEXT}",
            "--tasks", "toy_mc,toy_gen", "--include_path", str(include), "--output_path", str(out),
            "--log_samples", "--batch_size", "4"]


@pytest.fixture(scope="module")
def lm_eval_run(server, tmp_path_factory):
    if shutil.which("lm_eval") is None and subprocess.run([sys.executable, "-c", "import lm_eval"]).returncode:
        pytest.skip('lm-evaluation-harness is not installed (pip install "lm_eval[api]")')
    work = tmp_path_factory.mktemp("lm_eval")
    for name in ("mc.jsonl", "gen.jsonl"):
        shutil.copy(TASKS / name, work / name)
    for name in ("toy_mc.yaml", "toy_gen.yaml"):
        (work / name).write_text((TASKS / name).read_text().replace("{DATA_DIR}", str(work)))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf"),
           "OPENAI_API_KEY": "sk-test"}
    proc = subprocess.run(lm_eval_command(server.base, work, work / "out"), env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next((work / "out").rglob("results_*.json")).read_text())
    samples = {task: [json.loads(line) for p in (work / "out").rglob(f"samples_{task}_*.jsonl")
                      for line in p.read_text().splitlines()] for task in ("toy_mc", "toy_gen")}
    return results, samples


@pytest.fixture(scope="module")
def reference():
    import transformers as tf
    from textcomplete.models.sources import default_model_path
    path = default_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


def reference_loglikelihood(tok, model, context: str, continuation: str) -> float:
    whole = tok(context + continuation)["input_ids"]
    ctx_len = len(tok(context)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(ctx_len, len(whole)))


def reference_generation(tok, model, context: str, max_new: int, until: list[str]) -> str:
    ids = tok(context)["input_ids"]
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0])
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_lm_eval_multiple_choice_matches_transformers(lm_eval_run, reference):
    results, samples = lm_eval_run
    tok, model = reference
    docs = [json.loads(line) for line in (TASKS / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        scores = [reference_loglikelihood(tok, model, doc["question"], c) for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    for sample in samples["toy_mc"]:
        doc = sample["doc"]
        ours = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in sample["filtered_resps"]]
        ref = [reference_loglikelihood(tok, model, doc["question"], c) for c in doc["choices"]]
        assert ours == pytest.approx(ref, abs=2e-3)


def test_lm_eval_generate_until_matches_transformers(lm_eval_run, reference):
    results, samples = lm_eval_run
    tok, model = reference
    docs = {d["question"]: d for d in map(json.loads, (TASKS / "gen.jsonl").read_text().splitlines())}
    matches = 0
    for sample in samples["toy_gen"]:
        question = sample["doc"]["question"]
        expected = reference_generation(tok, model, question, 24, ["."])
        got = sample["filtered_resps"][0]
        got = got[0] if isinstance(got, list) else got
        assert got == expected, question
        matches += int(expected == docs[question]["answer"])
    assert results["results"]["toy_gen"]["exact_match,none"] == pytest.approx(matches / len(docs))
