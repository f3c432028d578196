"""Decoding tests: greedy parity with Hugging Face's `generate`, cache vs full forward, sampling,
and the same tokens on 8 simulated devices as on one."""

import dataclasses
import functools
import json
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process

from bloom_jax import convert, decoding, flops
from bloom_jax.decoding import PAD_ID, Sampling, choose, generate_ids, left_pad
from bloom_jax.model import BloomConfig, BloomForCausalLM
from tests import forked_commands
from tests.conftest import xla_flags

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
                                             ("8_heads", "xla")])
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


def test_the_prefill_computes_no_logits_but_the_last():
    """[batch, prompt, vocab] float32 logits would be the decode's largest temporary."""
    config = BloomConfig(vocab_size=8192, hidden_size=32, n_layer=2, n_head=4)
    batch, prompt = 4, 256
    compiled = decoding.generator(config).compile(decoding.Limits(4), batch, prompt)
    all_logits = batch * prompt * config.vocab_size * 4
    assert compiled.fn.memory_analysis().temp_size_in_bytes < all_logits / 2


def test_the_cpu_head_copy_decodes_the_tokens_of_the_tied_head():
    """On CPU, `put_params` adds the embedding's [embed, vocab] copy (HEAD_COPY); params
    without it decode through the embedding itself, as on an accelerator."""
    config, params, ids, mask = tiny_model()
    run = decoding.generator(config)
    placed = run.put_params(params)
    np.testing.assert_array_equal(placed[decoding.HEAD_COPY],
                                  params["word_embeddings"]["embedding"].T)
    args = (ids, mask, decoding.row_keys([0] * len(ids), range(len(ids))),
            Sampling().rows(len(ids)))
    limits = decoding.Limits(NEW_TOKENS, eos_token_id=None)
    np.testing.assert_array_equal(run.generate(limits, placed, *args),
                                  run.generate(limits, params, *args))


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
    rows = Sampling(temperature=1.0, top_k=2).rows(1)
    draws = jax.vmap(lambda key: choose(logits, rows, key[None]))(keys)
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


def eight_devices(mode: str, out_dir: pathlib.Path) -> None:
    """Runs tests/decoding_eight_devices.py MODE in a process of its own with 8 CPU devices
    (forked: tests/forked_commands.py)."""
    done = forked_commands.run(["tests/decoding_eight_devices.py", mode, str(out_dir)],
                               env=dict(os.environ, XLA_FLAGS=xla_flags(devices=8)),
                               timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_meshes_of_eight_devices_decode_the_tokens_of_one(tmp_path):
    from tests import decoding_eight_devices as run8
    eight_devices("parity", tmp_path)
    results = np.load(tmp_path / "parity.npz")
    shards = json.loads((tmp_path / "shardings.json").read_text())
    config = run8.CONFIG
    cache_len = 7 + run8.NEW_TOKENS - 1  # the longest prompt and all new tokens but the last
    for data, fsdp, tensor in run8.MESHES:
        name = f"{data}x{fsdp}x{tensor}"
        for kind in ("greedy", "sampled"):
            np.testing.assert_array_equal(results[f"{name}/{kind}"], results[f"single/{kind}"],
                                          err_msg=f"{kind} on mesh {name}")
        # Three prompts padded to a multiple of data x fsdp rows, split over them; heads over
        # tensor; parameters as training lays them out.
        rows = -(-3 // (data * fsdp)) * (data * fsdp) // (data * fsdp)
        assert shards[name]["cache_key"] == [rows, config.n_head // tensor, cache_len,
                                             config.head_dim]
        assert shards[name]["cache_token_mask"] == [rows, cache_len]
        assert shards[name]["query_key_value"] == [config.hidden_size // fsdp,
                                                   config.n_head // tensor, 3, config.head_dim]
        assert shards[name]["word_embeddings"] == [config.vocab_size // tensor,
                                                   config.hidden_size // fsdp]
    assert not np.array_equal(results["single/greedy"], results["single/sampled"])


@pytest.mark.slow
def test_bloom_7b1_decode_compiles_for_eight_80_gb_devices(tmp_path):
    """On abstract arrays: nothing is allocated. The CPU backend computes bfloat16 in float32,
    so its temporaries (float32 copies of weights and cache) bound a GPU's from above."""
    from tests import decoding_eight_devices as run8
    eight_devices("plan", tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    config = run8.PLAN_CONFIG
    # bfloat16, with the CPU's [embed, vocab] copy of the embedding for the head (HEAD_COPY).
    params = (flops.param_count(config) + config.vocab_size * config.hidden_size) * 2
    # Parameters arrive split over the 8 devices, not replicated.
    assert params / 8 <= plan["argument_bytes"] < params / 8 * 1.05
    assert plan["peak_bytes"] < 80 * 2**30
