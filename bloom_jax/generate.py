"""`python -m bloom_jax.generate`: continue prompts with BLOOM, on one device or a mesh.

The decoding itself (key/value cache, sampling, sharding) is `bloom_jax.decoding`.

    python -m bloom_jax.generate --hf_dir=DIR --prompt="Hello" [--prompt=...] \\
        [--max_new_tokens=32] [--temperature=0.8 --top_k=50 --top_p=0.95] [--seed=0] \\
        [--mesh=1,1,8]
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags

from bloom_jax import configs, decoding
from bloom_jax.data import vocabulary_files
from bloom_jax.decoding import generate_ids, left_pad
from partitioning.mesh import create_mesh

FLAGS = flags.FLAGS


def define_model_flags() -> None:
    """Which model to load and where to run it (shared with `bloom_jax.serve`)."""
    flags.DEFINE_string("ckpt_dir", None, "A bloom_jax checkpoint directory, or a training run's "
                        "MODEL_DIR (its latest step).")
    flags.DEFINE_string("hf_dir", None, "A Hugging Face BLOOM directory (config.json, weights, "
                        "tokenizer.json), as save_pretrained writes it.")
    flags.DEFINE_string("vocabulary", None, "tokenizer.json or SentencePiece .model, as the "
                        "trainer's VOCABULARY (default: HF_DIR/tokenizer.json with --hf_dir, the "
                        "embedded SentencePiece model with --ckpt_dir).")
    flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor: the device mesh, laid out "
                      "as training lays it (-1: the remaining devices); e.g. 1,1,8 splits a "
                      "large model's heads over 8 GPUs.")
    flags.register_validator(
        "mesh", lambda sizes: len(sizes) == 3 and all(s.lstrip("-").isdigit() for s in sizes),
        "--mesh takes three integers: data,fsdp,tensor.")
    flags.register_multi_flags_validator(
        ["ckpt_dir", "hf_dir"], lambda values: bool(values["ckpt_dir"]) != bool(values["hf_dir"]),
        "Give exactly one of --ckpt_dir and --hf_dir.")


def define_flags() -> None:
    """The command's flags (configs.run adds --verbose)."""
    define_model_flags()
    flags.DEFINE_multi_string("prompt", None, "Text to continue; repeat the flag for a batch.",
                              required=True)
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", None, "Sampling temperature; 0 is greedy (default when "
                       "sampling: 1.0).")
    flags.DEFINE_integer("top_k", None, "Sample among the K most likely tokens only.")
    flags.DEFINE_float("top_p", None, "Sample among the most likely tokens holding probability "
                       "P only.")
    flags.DEFINE_integer("seed", 0, "Seed of the draws.")


def load_model(ckpt_dir: str | None = None, hf_dir: str | None = None,
               vocabulary: str | None = None,
               mesh: Sequence[int] = (-1, 1, 1)) -> tuple[decoding.Generator, Any, Any]:
    """(generator on `mesh` (data, fsdp, tensor), its params, vocabulary) from `hf_dir` or
    `ckpt_dir` and `vocabulary`, as the flags of the same names give them."""
    # Imported here: they bring in orbax and safetensors, which generate_ids needs not.
    from bloom_jax import convert, param_store

    mesh = create_mesh(*mesh)
    if hf_dir:
        config, params = convert.load_hf_checkpoint(hf_dir)
        run = decoding.generator(config, mesh)
        params = jax.device_put(params, run.param_shardings)
        vocabulary = vocabulary or pathlib.Path(hf_dir) / "tokenizer.json"
    else:
        config = param_store.load_config(param_store.checkpoint_dir(ckpt_dir))
        run = decoding.generator(config, mesh)
        _, params = param_store.load_params(ckpt_dir, shardings=run.param_shardings)
    vocabulary = vocabulary_files.open_vocabulary(vocabulary)
    vocabulary_files.check_fits_model(vocabulary.vocab_size, vocabulary.path, config.vocab_size)
    return run, params, vocabulary


def load_flagged_model() -> tuple[decoding.Generator, Any, Any]:
    """`load_model` of --ckpt_dir or --hf_dir, --vocabulary and --mesh."""
    return load_model(FLAGS.ckpt_dir, FLAGS.hf_dir, FLAGS.vocabulary,
                      [int(size) for size in FLAGS.mesh])


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    run, params, vocabulary = load_flagged_model()
    prompts = [vocabulary.encode(text) for text in FLAGS.prompt]
    if not all(prompts):
        raise ValueError("a --prompt encodes to no tokens; give it some text.")
    ids, mask = left_pad(prompts, vocabulary.pad_id)
    out = generate_ids(run.config, params, ids, FLAGS.max_new_tokens, attention_mask=mask,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       seed=FLAGS.seed, eos_token_id=vocabulary.eos_id,
                       pad_token_id=vocabulary.pad_id, mesh=run.mesh)
    for text, new_ids in zip(FLAGS.prompt, np.asarray(out)[:, ids.shape[1]:]):
        print(text + vocabulary.decode(new_ids.tolist()))  # decode stops at EOS


if __name__ == "__main__":
    define_flags()
    configs.run(main, gin_flags=False)
