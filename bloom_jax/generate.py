"""Text generation with BLOOM: batched, key/value cached, greedy or sampled.

The prompt is prefilled in one forward pass that fills the cache; each new token is then one
cached step of a jitted `jax.lax.while_loop`. Greedy output is token for token that of Hugging
Face's `generate` (left-padded prompts included: ALiBi positions skip the padding, as there).

    python -m bloom_jax.generate --hf_dir=DIR --prompt="Hello" [--prompt=...] \\
        [--max_new_tokens=32] [--temperature=0.8 --top_k=50 --top_p=0.95] [--seed=0]
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bloom_jax import configs
from bloom_jax.model import BloomConfig, BloomForCausalLM

Array = jax.Array

# BLOOM's special ids (its tokenizer.json): end of sequence and padding.
EOS_ID = 2
PAD_ID = 3


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    temperature 0 takes the argmax (greedy). Otherwise a token is drawn from
    softmax(logits / temperature), keeping only the top_k most likely tokens (0: all) and the
    smallest set of them whose probability reaches top_p (1.0: all), filtered in that order, as
    Hugging Face's samplers do.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 for greedy "
                             "decoding or a positive value to sample.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is negative; use 0 to keep every token.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; use 1.0 to keep every token.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filter(self, logits: Array) -> Array:
        """Scaled logits with the tokens outside top_k and top_p set to -inf: [..., vocab]."""
        logits = logits.astype(jnp.float32) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth_largest = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
        if self.top_p < 1:
            descending = -jnp.sort(-logits, axis=-1)
            probs = jax.nn.softmax(descending, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            # The least likely token still needed to reach top_p (the most likely one always is).
            smallest_kept = jnp.min(jnp.where(mass_before < self.top_p, descending, jnp.inf),
                                    axis=-1, keepdims=True)
            logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
        return logits

    def __call__(self, logits: Array, key: Array) -> Array:
        """Next token ids [batch] from logits [batch, vocab]."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)


def sampling_from(temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None) -> Sampling:
    """Greedy when no argument is given; otherwise sampling, at temperature 1.0 by default."""
    if temperature is None and top_k is None and top_p is None:
        return Sampling()
    return Sampling(temperature=1.0 if temperature is None else float(temperature),
                    top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p))


def generate_ids(
    config: BloomConfig,
    params: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | None = EOS_ID,
    pad_token_id: int = PAD_ID,
) -> Array:
    """The prompts followed by `max_new_tokens` generated ids: [batch, prompt_len + max_new_tokens].

    prompt_ids: [batch, prompt_len] ints; attention_mask: [batch, prompt_len], 0 on left padding
    (default: no padding). Decoding is greedy unless temperature, top_k or top_p is given (see
    `Sampling`); seed fixes the draws. A row stops at its first eos_token_id and is filled with
    pad_token_id after it, as Hugging Face's `generate` does; eos_token_id=None never stops.
    """
    prompt_ids = np.asarray(prompt_ids)
    attention_mask = _checked_mask(config, prompt_ids, attention_mask)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative.")
    if max_new_tokens == 0:
        return jnp.asarray(prompt_ids, jnp.int32)
    return _generate(config, params, jnp.asarray(prompt_ids, jnp.int32),
                     jnp.asarray(attention_mask, jnp.int32), jax.random.key(seed),
                     max_new_tokens=max_new_tokens,
                     sampling=sampling_from(temperature, top_k, top_p),
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def _checked_mask(config: BloomConfig, prompt_ids: np.ndarray, attention_mask: Any) -> np.ndarray:
    """The prompts' attention mask (all ones by default), after checking ids and padding."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0 or prompt_ids.dtype.kind not in "iu":
        raise ValueError(f"prompt_ids must be integer ids of shape [batch, prompt_len >= 1], got "
                         f"{prompt_ids.dtype} {prompt_ids.shape}; wrap a single prompt as [ids].")
    if prompt_ids.min() < 0 or prompt_ids.max() >= config.vocab_size:
        raise ValueError(f"prompt_ids hold ids outside [0, {config.vocab_size}), the model's "
                         "vocabulary; was the prompt encoded with this model's tokenizer?")
    if attention_mask is None:
        return np.ones_like(prompt_ids)
    mask = np.asarray(attention_mask)
    if mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, prompt_ids {prompt_ids.shape}; "
                         "give one 0/1 entry per prompt token.")
    if not np.all(mask[:, -1] == 1) or np.any(np.diff(mask, axis=1) < 0):
        raise ValueError("attention_mask must pad on the left (zeros, then ones up to the last "
                         "column): new tokens are appended after the last column.")
    return mask


@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "sampling", "eos_token_id", "pad_token_id"))
def _generate(config: BloomConfig, params: Any, prompt_ids: Array, attention_mask: Array,
              key: Array, *, max_new_tokens: int, sampling: Sampling, eos_token_id: int | None,
              pad_token_id: int) -> Array:
    """Prefill, then one cached step per token until every row has stopped."""
    model = BloomForCausalLM(config)
    batch, prompt_len = prompt_ids.shape
    # The last new token is never fed back, so the cache holds one token less than the output.
    empty = jnp.zeros((batch, prompt_len + max_new_tokens - 1), jnp.int32)
    # An empty cache; jit drops the parameter initialization that comes with it.
    cache = nn.unbox(model.init(jax.random.key(0), empty, decode=True)["cache"])

    def forward(ids, mask, cache):  # -> last position's logits [batch, vocab], new cache
        logits, variables = model.apply({"params": params, "cache": cache}, ids, mask,
                                        decode=True, mutable=["cache"])
        return logits[:, -1], variables["cache"]

    def choose(logits, step, done):  # -> next tokens [batch], rows stopped after them
        token = sampling(logits, jax.random.fold_in(key, step))
        token = jnp.where(done, pad_token_id, token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        return token, done

    logits, cache = forward(prompt_ids, attention_mask, cache)
    token, done = choose(logits, 0, jnp.zeros((batch,), bool))
    new_tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

    def unfinished(state):
        step, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_once(state):
        step, token, done, new_tokens, cache = state
        logits, cache = forward(token[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        token, done = choose(logits, step, done)
        return step + 1, token, done, new_tokens.at[:, step].set(token), cache

    state = jax.lax.while_loop(unfinished, step_once, (1, token, done, new_tokens, cache))
    return jnp.concatenate([prompt_ids, state[3]], axis=1)


# ------------------------------------------------------------------------------------------ CLI

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one left-padded batch: (ids, attention_mask), both [batch, longest]."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (configs.run adds --verbose)."""
    flags.DEFINE_string("ckpt_dir", None, "A bloom_jax checkpoint directory, or a training run's "
                        "MODEL_DIR (its latest step).")
    flags.DEFINE_string("hf_dir", None, "A Hugging Face BLOOM directory (config.json, weights, "
                        "tokenizer.json), as save_pretrained writes it.")
    flags.DEFINE_multi_string("prompt", None, "Text to continue; repeat the flag for a batch.",
                              required=True)
    flags.DEFINE_string("vocabulary", None, "tokenizer.json or SentencePiece .model, as the "
                        "trainer's VOCABULARY (default: HF_DIR/tokenizer.json with --hf_dir, the "
                        "embedded SentencePiece model with --ckpt_dir).")
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy (default when "
                       "sampling: 1.0).")
    flags.DEFINE_integer("top_k", None, "Sample among the K most likely tokens only.")
    flags.DEFINE_float("top_p", None, "Sample among the most likely tokens holding probability "
                       "P only.")
    flags.DEFINE_integer("seed", 0, "Seed of the draws.")
    flags.register_multi_flags_validator(
        ["ckpt_dir", "hf_dir"], lambda values: bool(values["ckpt_dir"]) != bool(values["hf_dir"]),
        "Give exactly one of --ckpt_dir and --hf_dir.")


def _load() -> tuple[BloomConfig, Any, Any]:
    """(config, params, vocabulary) from --hf_dir or --ckpt_dir and --vocabulary."""
    # Imported here: they bring in orbax, safetensors and TensorFlow, which generate_ids needs not.
    from bloom_jax import convert, param_store
    from bloom_jax.data import vocabularies

    if FLAGS.hf_dir:
        config, params = convert.load_hf_checkpoint(FLAGS.hf_dir)
        vocabulary = FLAGS.vocabulary or pathlib.Path(FLAGS.hf_dir) / "tokenizer.json"
    else:
        config, params = param_store.load_params(FLAGS.ckpt_dir)
        vocabulary = FLAGS.vocabulary
    vocabulary = vocabularies.load_vocabulary(vocabulary)
    vocabularies.check_fits_model(vocabulary, config.vocab_size)
    return config, params, vocabulary


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    config, params, vocabulary = _load()
    prompts = [vocabulary.encode(text) for text in FLAGS.prompt]
    if not all(prompts):
        raise ValueError("a --prompt encodes to no tokens; give it some text.")
    ids, mask = left_pad(prompts, vocabulary.pad_id)
    out = generate_ids(config, params, ids, FLAGS.max_new_tokens, attention_mask=mask,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       seed=FLAGS.seed, eos_token_id=vocabulary.eos_id,
                       pad_token_id=vocabulary.pad_id)
    for text, new_ids in zip(FLAGS.prompt, np.asarray(out)[:, ids.shape[1]:]):
        print(text + vocabulary.decode(new_ids.tolist()))  # decode stops at EOS


if __name__ == "__main__":
    define_flags()
    configs.run(main, gin_flags=False)
