"""The generate command: prompts continued as Hugging Face continues them, from each kind of
checkpoint directory, and its flags."""

import pathlib
import subprocess

import pytest
import tokenizers

from bloom_jax import configs, convert
from bloom_jax.decoding import EOS_ID, PAD_ID, left_pad
from tests import forked_commands
from tests.test_decoding import NEW_TOKENS, hf_generate, hf_model_and_params

# The command decodes the same prompts with the same model from each kind of directory: the
# program compiled once.


def word_tokenizer(path, vocab_size):
    """A whitespace word-level tokenizer.json with BLOOM's special ids (unk 0, eos 2, pad 3)."""
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(4, vocab_size)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return tokenizer


def saved_hf_model(hf_dir: pathlib.Path):
    """(HF model, config, params, tokenizer) of a random 6-head BLOOM saved with a word-level
    tokenizer.json in `hf_dir`, as a Hugging Face directory."""
    model, config, params = hf_model_and_params("6_heads")
    model.save_pretrained(hf_dir)
    return model, config, params, word_tokenizer(hf_dir / "tokenizer.json", config.vocab_size)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m bloom_jax.generate ARGS` (forked: tests/forked_commands.py)."""
    return forked_commands.run(["generate", *args])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf_dir", "ckpt_dir", "model_dir"])
def test_cli_continues_prompts_as_hugging_face_does(source, tmp_path):
    """From a Hugging Face directory, a converted checkpoint, or a run's MODEL_DIR (whose
    checkpoints/ folder holds it)."""
    hf_dir = tmp_path / "hf"
    model, _, _, tokenizer = saved_hf_model(hf_dir)
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


def test_generate_and_serve_load_a_model_without_tensorflow(tmp_path):
    """The tokenizer.json opens without seqio, whose TensorFlow costs ~5 s and ~0.8 GB."""
    hf_dir = tmp_path / "hf"
    saved_hf_model(hf_dir)
    assert forked_commands.heavy_modules_after(
        f"from bloom_jax import generate, serve; generate.load_model(hf_dir={str(hf_dir)!r})") == []


@pytest.mark.slow
def test_cli_help_and_bad_flags():
    helped = run_cli("--help")
    assert helped.returncode == 0 and "--top_p" in helped.stdout
    done = run_cli("--prompt=hello")  # neither --ckpt_dir nor --hf_dir
    assert done.returncode == configs.EXIT_USAGE
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: flags ckpt_dir=None, hf_dir=None: Give exactly one of --ckpt_dir and --hf_dir.")
