"""Generation tests: greedy parity with Hugging Face's `generate`, cache vs full forward, sampling,
and the CLI."""

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from transformers.generation import logits_process

from bloom_jax import configs, convert
from bloom_jax.generate import EOS_ID, PAD_ID, Sampling, generate_ids, left_pad
from bloom_jax.model import BloomConfig, BloomForCausalLM

# Two shapes: a head count that is not a power of two (ALiBi's extra slopes) and one that is.
HF_SHAPES = {
    "6_heads": dict(vocab_size=256, hidden_size=48, n_layer=2, n_head=6),
    "8_heads": dict(vocab_size=256, hidden_size=64, n_layer=3, n_head=8),
}
NEW_TOKENS = 8


def left_padded(lengths, vocab_size, seed):
    """Random prompts of the given lengths, left-padded to the longest: (ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(4, vocab_size, length) for length in lengths], PAD_ID)


@functools.lru_cache
def hf_model_and_params(shape: str):
    """A random-weight `transformers.BloomForCausalLM` (biases and LayerNorms perturbed too),
    and our config and parameters read from its `save_pretrained` directory.

    Weights far larger than BLOOM's init make every layer matter: with small ones, the tied
    embeddings dominate and greedy decoding only repeats the last token.
    """
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(**HF_SHAPES[shape])).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            std = 0.1 if "layernorm" in name or "ln_f" in name else 0.5
            weight.add_(std * torch.randn_like(weight))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        config, params = convert.load_hf_checkpoint(directory)
    return model, config, params


def hf_generate(model, ids, mask, eos_token_id):
    """HF's greedy ids, padded to the full length as ours are (HF stops when all rows have)."""
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=PAD_ID).numpy()
    return np.pad(out, ((0, 0), (0, ids.shape[1] + NEW_TOKENS - out.shape[1])),
                  constant_values=PAD_ID)


@pytest.mark.parametrize("lengths", [(6, 6), (6, 3, 1)], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("shape,attention", [("6_heads", "auto"), ("8_heads", "auto"),
                                             ("8_heads", "einsum")])
def test_greedy_matches_hugging_face(shape, attention, lengths):
    model, config, params = hf_model_and_params(shape)
    config = dataclasses.replace(config, attention_implementation=attention)
    ids, mask = left_padded(lengths, config.vocab_size, seed=len(lengths))
    # Make the third token row 0 generates its EOS, so that stopping and padding are checked too.
    eos = int(generate_ids(config, params, ids, NEW_TOKENS, attention_mask=mask,
                           eos_token_id=None)[0, ids.shape[1] + 2])
    ours = np.asarray(generate_ids(config, params, ids, NEW_TOKENS, attention_mask=mask,
                                   eos_token_id=eos))
    np.testing.assert_array_equal(ours, hf_generate(model, ids, mask, eos))
    new = ours[0, ids.shape[1]:]
    stop = list(new).index(eos)
    assert stop <= 2 and np.all(new[stop + 1:] == PAD_ID)


def test_cached_steps_match_the_full_forward():
    config = BloomConfig(vocab_size=128, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.2)
    model = BloomForCausalLM(config)
    ids, mask = left_padded((7, 2, 5), config.vocab_size, seed=0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))["params"]
    out = generate_ids(config, params, ids, NEW_TOKENS, attention_mask=mask, eos_token_id=None)
    full_mask = np.pad(mask, ((0, 0), (0, NEW_TOKENS)), constant_values=1)
    logits = model.apply({"params": params}, out, full_mask)
    # The token after each position, as the uncached forward over the whole output picks it.
    np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:-1], -1),
                                  out[:, ids.shape[1]:])


@functools.lru_cache
def tiny_model():
    config = BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    ids, mask = left_padded((5, 3), config.vocab_size, seed=1)
    params = nn.unbox(jax.jit(BloomForCausalLM(config).init)(jax.random.key(0), ids))["params"]
    return config, params, ids, mask


def test_sampling_is_reproducible_from_its_seed():
    config, params, ids, mask = tiny_model()
    sample = functools.partial(generate_ids, config, params, ids, NEW_TOKENS, attention_mask=mask,
                               temperature=2.0, top_p=0.99, eos_token_id=None)
    first = sample(seed=3)
    np.testing.assert_array_equal(sample(seed=3), first)
    assert not np.array_equal(sample(seed=4), first)


def test_top_k_of_one_is_greedy():
    config, params, ids, mask = tiny_model()
    greedy = generate_ids(config, params, ids, NEW_TOKENS, attention_mask=mask)
    np.testing.assert_array_equal(
        generate_ids(config, params, ids, NEW_TOKENS, attention_mask=mask, top_k=1, seed=7),
        greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.0, 0, 0.6), (1.3, 10, 0.8)])
def test_filters_match_hugging_face_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    warpers = [logits_process.TemperatureLogitsWarper(temperature)]
    warpers += [logits_process.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [logits_process.TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = logits_process.LogitsProcessorList(warpers)(None, torch.from_numpy(logits)).numpy()
    ours = np.asarray(Sampling(temperature, top_k, top_p).filter(jnp.asarray(logits)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_draws_stay_inside_the_filter():
    logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 2.8]])
    keys = jax.random.split(jax.random.key(0), 200)
    draws = jax.vmap(lambda key: Sampling(temperature=1.0, top_k=2)(logits, key))(keys)
    assert set(np.asarray(draws).ravel().tolist()) == {1, 2}


def test_bad_inputs_are_explained():
    config, params, ids, mask = tiny_model()
    with pytest.raises(ValueError, match="pad on the left"):
        generate_ids(config, params, ids, 2, attention_mask=mask[:, ::-1])
    with pytest.raises(ValueError, match="outside"):
        generate_ids(config, params, ids + config.vocab_size, 2)
    with pytest.raises(ValueError, match=r"\[batch, prompt_len"):
        generate_ids(config, params, ids[0], 2)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(config, params, ids, 2, top_p=0.0)


def word_tokenizer(path, vocab_size):
    """A whitespace word-level tokenizer.json with BLOOM's special ids (unk 0, eos 2, pad 3)."""
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, vocab_size)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return tokenizer


def run_cli(*args: str) -> subprocess.CompletedProcess:
    root = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "bloom_jax.generate", *args], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root)))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf_dir", "ckpt_dir", "model_dir"])
def test_cli_continues_prompts_as_hugging_face_does(source, tmp_path):
    """From a Hugging Face directory, a converted checkpoint, or a run's MODEL_DIR (whose
    checkpoints/ folder holds it)."""
    model, config, _ = hf_model_and_params("6_heads")
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokenizer = word_tokenizer(hf_dir / "tokenizer.json", config.vocab_size)
    if source == "hf_dir":
        flags = [f"--hf_dir={hf_dir}"]
    else:
        convert.from_hf(hf_dir, tmp_path / "run" / "checkpoints")
        ckpt_dir = tmp_path / "run" if source == "model_dir" else tmp_path / "run" / "checkpoints"
        flags = [f"--ckpt_dir={ckpt_dir}", f"--vocabulary={hf_dir / 'tokenizer.json'}"]
    prompts = ["w10 w200 w31 w7", "w99"]
    done = run_cli(*flags, f"--prompt={prompts[0]}", f"--prompt={prompts[1]}",
                   f"--max_new_tokens={NEW_TOKENS}")
    assert done.returncode == 0, done.stderr[-3000:]
    ids, mask = left_pad([tokenizer.encode(p).ids for p in prompts], PAD_ID)
    new_ids = hf_generate(model, ids, mask, eos_token_id=EOS_ID)[:, ids.shape[1]:].tolist()
    expected = [row[:row.index(EOS_ID) + 1] if EOS_ID in row else row for row in new_ids]
    assert done.stdout.splitlines() == [p + tokenizer.decode(row, skip_special_tokens=False)
                                        for p, row in zip(prompts, expected)]


@pytest.mark.slow
def test_cli_help_and_bad_flags():
    helped = run_cli("--help")
    assert helped.returncode == 0 and "--top_p" in helped.stdout
    done = run_cli("--prompt=hello")  # neither --ckpt_dir nor --hf_dir
    assert done.returncode == configs.EXIT_USAGE
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: flags ckpt_dir=None, hf_dir=None: Give exactly one of --ckpt_dir and --hf_dir.")
