"""`python -m bloom_jax.harness`: EleutherAI's lm-eval over a bloom_jax checkpoint.

    python -m bloom_jax.harness --model bloom_jax --model_args ckpt_dir=DIR[,vocabulary=FILE] \\
        --tasks xnli_fr,xstorycloze_es --batch_size 16 [any other lm-eval flag]
    python -m bloom_jax.harness --model bloom_jax --model_args hf_dir=DIR,mesh=1x1x8 ...

The command is lm-eval's own (`lm_eval --help`) with the model `bloom_jax` registered: `BloomLM`
scores continuations with the model's own per-token log-probabilities (the exact tokens lm-eval
asks for, in float32) and generates with `bloom_jax.decoding` on a mesh laid out as training
lays it. From Python: `lm_eval.simple_evaluate(model=BloomLM(ckpt_dir=...), tasks=[...])`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from bloom_jax import decoding, generate, sharded_step
from bloom_jax.model import BloomForCausalLM

# BLOOM's training length: lm-eval truncates contexts on the left to fit it.
MAX_LENGTH = 2048
# generate_until's keyword arguments that BloomLM follows (lm-eval's names).
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _token_logprobs(model: BloomForCausalLM, params: Any, ids: jax.Array, mask: jax.Array,
                    targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(targets) [batch, length] (float32) of right-padded `ids`, and whether each target is
    the argmax."""
    logits = model.apply({"params": params}, ids, mask).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _bucket(n: int, smallest: int = 16) -> int:
    """`n` rounded up to a power of two (at least `smallest`): few shapes, few compiles."""
    return max(smallest, decoding.power_of_two(n))


@register_model("bloom_jax")
class BloomLM(TemplateLM):
    """lm-eval's `LM` over a bloom_jax checkpoint (`ckpt_dir`, a run's MODEL_DIR or a converted
    one, with `vocabulary`) or a Hugging Face BLOOM directory (`hf_dir`), on `mesh`
    ("data x fsdp x tensor", e.g. 1x1x8). lm-eval passes `device` and `max_batch_size` too:
    JAX places the model on `mesh`, and every batch has `batch_size` rows."""

    def __init__(self, ckpt_dir: str | None = None, hf_dir: str | None = None,
                 vocabulary: str | None = None, mesh: str = "-1x1x1", batch_size: int | str = 16,
                 max_length: int = MAX_LENGTH, max_gen_toks: int = 256,
                 device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        if bool(ckpt_dir) == bool(hf_dir):
            raise ValueError("give exactly one of ckpt_dir and hf_dir in --model_args.")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} is not a positive number; give one, e.g. "
                             "--batch_size 16 (bloom_jax does not search for it).")
        sizes = str(mesh).split("x")
        if len(sizes) != 3 or not all(s.lstrip("-").isdigit() for s in sizes):
            raise ValueError(f"mesh={mesh} is not data x fsdp x tensor; give e.g. mesh=1x1x8.")
        self.run, self.params, self.vocabulary = generate.load_model(
            ckpt_dir, hf_dir, vocabulary, [int(s) for s in sizes])
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self._score = sharded_step.MeshFunction(
            jax.jit(functools.partial(_token_logprobs, self.run.model)), self.run.mesh,
            self.run.rules)

    @property
    def eot_token_id(self) -> int:
        return self.vocabulary.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return self.vocabulary.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.vocabulary.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy one) per request of
        ((context, continuation) texts, context ids, continuation ids)."""
        rows = [self._scored_row(context, continuation)
                for _, context, continuation in requests]
        # Longest first, so that each batch pads little; answers go back in request order.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, answer in zip(chunk, self._score_rows([rows[i] for i in chunk])):
                answers[i] = answer
                request_args = requests[i][0]
                if request_args is not None:
                    self.cache_hook.add_partial("loglikelihood", request_args, answer)
        return answers

    def _scored_row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(input ids, number of final targets that are the continuation): the text cut on the
        left to `max_length` inputs, as Hugging Face's lm-eval model cuts it."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole, min(len(continuation), len(whole) - 1)

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """One padded forward over `rows` (at most batch_size) of (ids, continuation length)."""
        width = _bucket(max(len(ids) - 1 for ids, _ in rows))
        ids = np.full((self.batch_size, width), self.vocabulary.pad_id, np.int32)
        targets = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, (tokens, _) in enumerate(rows):
            ids[row, :len(tokens) - 1] = tokens[:-1]
            targets[row, :len(tokens) - 1] = tokens[1:]
            mask[row, :len(tokens) - 1] = 1
        logprobs, greedy = self._score(self.params, *self.run.put_rows((ids, mask, targets)))
        logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
        answers = []
        for row, (tokens, scored) in enumerate(rows):
            span = slice(len(tokens) - 1 - scored, len(tokens) - 1)
            answers.append((float(logprobs[row, span].sum()), bool(greedy[row, span].all())))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, scored in disjoint windows of `max_length` tokens
        (lm-eval's rolling windows, as for Hugging Face models)."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy unless do_sample) up to `max_gen_toks` tokens or the
        first of its `until` strings, which is cut off; requests with the same settings are
        decoded `batch_size` at a time."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        answers = [""] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                texts = self._generate(contexts, dict(requests[chunk[0]].args[1]))
                for i, text in zip(chunk, texts):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return answers

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """`contexts` continued under lm-eval's `gen_kwargs`, as one left-padded batch."""
        unknown = set(gen_kwargs) - GEN_KWARGS
        if unknown:
            raise ValueError(f"generate_until got {sorted(unknown)}; bloom_jax follows only "
                             f"{sorted(GEN_KWARGS)}.")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [stop for stop in until if stop]
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        sample = bool(gen_kwargs.get("do_sample")) and gen_kwargs.get("temperature", 1.0) > 0
        prompts = [self.tok_encode(context)[-(self.max_length - max_new):]
                   for context in contexts]
        ids, mask = decoding.left_pad(prompts, self.vocabulary.pad_id)
        width = _bucket(ids.shape[1])  # padded on the left, rows to batch_size: few compiles
        ids = np.pad(ids, ((0, self.batch_size - len(ids)), (width - ids.shape[1], 0)),
                     constant_values=self.vocabulary.pad_id)
        mask = np.pad(mask, ((0, self.batch_size - len(mask)), (width - mask.shape[1], 0)))
        mask[len(prompts):, -1] = 1  # the rows added to fill the batch are one padding token
        new = decoding.generate_ids(
            self.run.config, self.params, ids, max_new, attention_mask=mask,
            temperature=gen_kwargs.get("temperature", 1.0) if sample else None,
            top_k=gen_kwargs.get("top_k") if sample else None,
            top_p=gen_kwargs.get("top_p") if sample else None,
            eos_token_id=self.eot_token_id, pad_token_id=self.vocabulary.pad_id,
            mesh=self.run.mesh)[:len(prompts), width:].tolist()
        texts = []
        for row in new:
            text = self.tok_decode(row[:row.index(self.eot_token_id)]
                                   if self.eot_token_id in row else row)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


if __name__ == "__main__":
    cli_evaluate()
