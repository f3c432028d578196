"""The lm-eval adapter: its log-likelihoods are Hugging Face BLOOM's log-probabilities of the same
tokens, its greedy generations are `generate`'s, and `python -m bloom_jax.harness` runs a local
XNLI-shaped task offline."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from bloom_jax import convert, decoding
from bloom_jax.harness import BloomLM
from tests.test_generate import saved_hf_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(HF model, tokenizer, HF directory, converted checkpoint directory) of a random BLOOM."""
    hf_dir = tmp_path_factory.mktemp("hf")
    model, _, _, tokenizer = saved_hf_model(hf_dir)
    ckpt_dir = hf_dir.parent / "ckpt"
    convert.from_hf(hf_dir, ckpt_dir)
    return model, tokenizer, hf_dir, ckpt_dir


@pytest.fixture(scope="module")
def lm(model_dirs):
    _, _, hf_dir, ckpt_dir = model_dirs
    return BloomLM(ckpt_dir=str(ckpt_dir), vocabulary=str(hf_dir / "tokenizer.json"),
                   batch_size=3, max_length=MAX_LENGTH)


def hf_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Hugging Face's log p(continuation | context) in float32, and whether it is greedy."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].float()
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    picked = logprobs[torch.arange(len(continuation)), target]
    return float(picked.sum()), bool((logits.argmax(-1) == target).all())


def words(rng, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(4, 256, n))


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def test_loglikelihood_is_hugging_faces(model_dirs, lm):
    """Contexts of several lengths (batched longest first, answers back in order), an empty one
    (scored after EOS) and one longer than max_length (cut on the left)."""
    model, tokenizer, _, _ = model_dirs
    rng = np.random.default_rng(0)
    pairs = [(words(rng, n), " " + words(rng, m)) for n, m in [(3, 1), (7, 4), (1, 2), (30, 3)]]
    pairs.append(("", words(rng, 3)))
    # A continuation that is the model's own greedy choice: is_greedy must say so.
    context = tokenizer.encode(pairs[0][0]).ids
    with torch.no_grad():
        best = int(model(torch.tensor([context])).logits[0, -1].argmax())
    pairs.append((pairs[0][0], f" w{best}"))
    ours = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, ours):
        context_ids = tokenizer.encode(context).ids or [decoding.EOS_ID]
        continuation_ids = tokenizer.encode(continuation).ids
        whole = (context_ids + continuation_ids)[-(MAX_LENGTH + 1):]
        expected = hf_logprob(model, whole[:-len(continuation_ids)], continuation_ids)
        assert logprob == pytest.approx(expected[0], abs=1e-4)
        assert greedy == expected[1]
    assert ours[-1][1]


def test_loglikelihood_rolling_is_hugging_faces(model_dirs, lm):
    """A text shorter than max_length is scored after EOS; a longer one in lm-eval's disjoint
    windows of max_length tokens."""
    model, tokenizer, _, _ = model_dirs
    rng = np.random.default_rng(1)
    texts = [words(rng, 9), words(rng, 40)]
    ours = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    short = tokenizer.encode(texts[0]).ids
    assert ours[0] == pytest.approx(hf_logprob(model, [decoding.EOS_ID], short)[0], abs=1e-4)
    windows = lm_utils.get_rolling_token_windows(tokenizer.encode(texts[1]).ids,
                                                 decoding.EOS_ID, MAX_LENGTH, 1)
    windows = list(map(lm_utils.make_disjoint_window, windows))
    assert len(windows) == 3
    expected = sum(hf_logprob(model, context, continuation)[0]
                   for context, continuation in windows)
    assert ours[1] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_generate_cut_at_until(model_dirs, lm):
    """Four contexts (two batches of three rows), greedy, cut at the first `until` string."""
    model, tokenizer, _, _ = model_dirs
    rng = np.random.default_rng(2)
    contexts = [words(rng, n) for n in (3, 5, 1, 4)]
    ids, mask = decoding.left_pad([tokenizer.encode(c).ids for c in contexts], decoding.PAD_ID)
    new = decoding.generate_ids(lm.run.config, lm.params, ids, 6, attention_mask=mask,
                                eos_token_id=None)[:, ids.shape[1]:]
    greedy = [tokenizer.decode(row) for row in new.tolist()]
    stop = " " + greedy[1].split()[3]  # cuts the second answer after three words
    ours = lm.generate_until(requests("generate_until", [
        (c, {"until": [stop], "max_gen_toks": 6, "do_sample": False}) for c in contexts]))
    assert ours == [text.split(stop)[0] for text in greedy]
    assert len(ours[1].split()) == 3


def test_bad_model_args_are_named(model_dirs):
    _, _, hf_dir, ckpt_dir = model_dirs
    with pytest.raises(ValueError, match="exactly one of ckpt_dir and hf_dir"):
        BloomLM(ckpt_dir=str(ckpt_dir), hf_dir=str(hf_dir))
    with pytest.raises(ValueError, match="batch_size=auto"):
        BloomLM(hf_dir=str(hf_dir), batch_size="auto")
    with pytest.raises(ValueError, match="mesh=1,1,8"):
        BloomLM(hf_dir=str(hf_dir), mesh="1,1,8")


TASK = """task: tiny_xnli
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: ''
doc_to_choice: '{{{{[premise+" w5 "+hypothesis, premise+" w6 "+hypothesis,
  premise+" w7 "+hypothesis]}}}}'
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.slow
def test_command_runs_a_local_xnli_shaped_task_offline(model_dirs, tmp_path):
    """lm-eval's own command line, its model `bloom_jax`: every choice's log-likelihood is Hugging
    Face's, and the accuracy follows from them."""
    model, tokenizer, hf_dir, ckpt_dir = model_dirs
    rng = np.random.default_rng(3)
    docs = [{"premise": words(rng, 4), "hypothesis": words(rng, 3), "label": i % 3}
            for i in range(5)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_xnli.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run(
        [sys.executable, "-m", "bloom_jax.harness", "--model", "bloom_jax", "--model_args",
         f"ckpt_dir={ckpt_dir},vocabulary={hf_dir / 'tokenizer.json'}", "--tasks", "tiny_xnli",
         "--include_path", str(tmp_path / "tasks"), "--batch_size", "4", "--log_samples",
         "--output_path", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line)
               for line in next((tmp_path / "out").rglob("samples_tiny_xnli_*.jsonl")).open()]
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        choices = [f"{doc['premise']} w{5 + c} {doc['hypothesis']}" for c in range(3)]
        expected = [hf_logprob(model, [decoding.EOS_ID], tokenizer.encode(c).ids)[0]
                    for c in choices]
        ours = [float(resp[0][0]) for resp in sample["resps"]]
        assert ours == pytest.approx(expected, abs=1e-4)
        correct += int(np.argmax(expected) == doc["label"])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["tiny_xnli"]["acc,none"] == pytest.approx(correct / len(docs))
