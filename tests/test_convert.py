"""Hugging Face parity and round trips of bloom_jax.convert, on tiny random BLOOMs."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
import transformers

from bloom_jax import convert, param_store
from bloom_jax import model as model_lib
from bloom_jax.model import BloomForCausalLM
from tests import forked_commands

REPO = Path(__file__).resolve().parents[1]


def random_hf_model(hidden=24, n_head=6, n_layer=2, vocab=1024, seed=0, dtype=torch.float32):
    """A transformers BLOOM whose every tensor is random (biases and LayerNorms included); its
    vocabulary is the size of the embedded SentencePiece model's, which `to_hf` exports."""
    torch.manual_seed(seed)
    config = transformers.BloomConfig(
        vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if name.endswith("weight") else 0.1)
    return model.to(dtype)


def padded_batch(vocab, length=7, seed=0):
    """Row 0 left-padded, row 1 right-padded, row 2 unpadded."""
    ids = np.random.default_rng(seed).integers(0, vocab, (3, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask)).logits
    return out.float().numpy()


def state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("hidden,n_head,n_layer", [(24, 6, 2), (20, 5, 1), (32, 4, 3)])
@pytest.mark.parametrize("scan_layers,attention", [(True, "xla"), (False, "auto")])
# 128 tokens: the einsum path ("auto" on CPUs) splits the queries into blocks; 7: it does not.
@pytest.mark.parametrize("length", [7, model_lib.CAUSAL_QUERY_BLOCKS * model_lib.CAUSAL_MIN_BLOCK])
def test_logits_match_hugging_face(tmp_path, hidden, n_head, n_layer, scan_layers, attention,
                                   length):
    model = random_hf_model(hidden, n_head, n_layer)
    model.save_pretrained(tmp_path)
    config, params = convert.load_hf_checkpoint(tmp_path)
    config = dataclasses.replace(config, scan_layers=scan_layers,
                                 attention_implementation=attention)
    ids, mask = padded_batch(config.vocab_size, length)

    ours = jax.jit(BloomForCausalLM(config).apply)({"params": params}, ids, attention_mask=mask)
    diff = np.abs(np.asarray(ours) - hf_logits(model, ids, mask))[mask == 1]
    assert diff.max() <= 1e-4, diff.max()


def save_bin(model, directory, shards):
    """An old-style PyTorch checkpoint: pytorch_model.bin, or `shards` files with an index."""
    model.config.save_pretrained(directory)
    tensors = model.state_dict()
    if shards == 1:
        torch.save(tensors, directory / "pytorch_model.bin")
        return
    names = list(tensors)
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[i]: tensors[names[i]] for i in part}, directory / file)
        weight_map.update({names[i]: file for i in part})
    (directory / convert.PYTORCH_INDEX).write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout,dtype", [
    ("safetensors", torch.float32), ("safetensors", torch.bfloat16),
    ("safetensors_sharded", torch.bfloat16), ("no_prefix", torch.float32),
    ("bin", torch.bfloat16), ("bin_sharded", torch.float32)])
def test_round_trip_is_bit_exact(tmp_path, layout, dtype):
    model = random_hf_model(dtype=dtype)
    hf_dir, ckpt, back = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "back"
    hf_dir.mkdir()
    if layout == "safetensors":
        model.save_pretrained(hf_dir)
    elif layout == "safetensors_sharded":
        model.save_pretrained(hf_dir, max_shard_size="20KB")
        assert (hf_dir / convert.SAFETENSORS_INDEX).is_file()
    elif layout == "no_prefix":  # a BloomModel checkpoint, as the official conversion wrote
        model.transformer.save_pretrained(hf_dir)
    else:
        save_bin(model, hf_dir, shards=3 if layout == "bin_sharded" else 1)

    convert.from_hf(hf_dir, ckpt)
    convert.to_hf(ckpt, back, max_shard_bytes=10_000)

    assert len(list(back.glob("*.safetensors"))) > 1  # sharded output, with an index
    index = json.loads((back / convert.SAFETENSORS_INDEX).read_text())["weight_map"]
    written = {}
    for file in set(index.values()):
        written.update(safetensors.torch.load_file(back / file))
    original = state_dict(model)
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


def test_checkpoint_params_equal_hf_and_restore_onto_shardings(tmp_path):
    model = random_hf_model()
    model.save_pretrained(tmp_path / "hf")
    config, expected = convert.load_hf_checkpoint(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, expected)
    restored_config, params = param_store.load_params(tmp_path / "ckpt", config, shardings)
    assert restored_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, expected)
    assert all(x.sharding == device for x in jax.tree.leaves(params))


def test_to_hf_reads_the_latest_step_of_a_trainer_checkpoint(tmp_path):
    model = random_hf_model(seed=1)
    model.save_pretrained(tmp_path / "hf")
    config, params = convert.load_hf_checkpoint(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    param_store.save_params(ckpt, config, jax.tree.map(np.zeros_like, params), step=3)
    with ocp.CheckpointManager(ckpt) as manager:  # a later step with the trainer's other items
        manager.save(7, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave({"mu": params}),
            train_state=ocp.args.JsonSave({"step": 7})))
    convert.to_hf(ckpt, tmp_path / "back")

    written = safetensors.torch.load_file(tmp_path / "back" / "model.safetensors")
    for name, tensor in state_dict(model).items():
        assert torch.equal(written[name], tensor), name


def run_cli(*args):
    """`python -m bloom_jax.convert ARGS`' stdout (forked: tests/forked_commands.py)."""
    result = forked_commands.run(["convert", *map(str, args)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_command_line_round_trip_loads_in_transformers(tmp_path):
    model = random_hf_model(hidden=20, n_head=5)
    model.save_pretrained(tmp_path / "hf")
    run_cli("from_hf", "--hf_dir", tmp_path / "hf", "--out_dir", tmp_path / "ckpt")
    run_cli("to_hf", "--ckpt_dir", tmp_path / "ckpt", "--out_dir", tmp_path / "back")

    reloaded = transformers.BloomForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids, mask = padded_batch(1024)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(model, ids, mask))
    assert "from_hf" in run_cli("--help") and "--ckpt_dir" in run_cli("to_hf", "--help")


@pytest.mark.slow
def test_export_is_whole_pipeline_generates_as_bloom_jax_generate(tmp_path):
    """to_hf writes the run's tokenizer and generation config: transformers' pipeline loads the
    directory alone and continues prompts with the text `bloom_jax.generate` prints."""
    random_hf_model(hidden=32, n_head=4, seed=3).save_pretrained(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")
    run_cli("to_hf", "--ckpt_dir", tmp_path / "ckpt", "--out_dir", tmp_path / "export")
    export = tmp_path / "export"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in export.iterdir()}

    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The river flows", "Les modèles de langue 42"]
    generated = forked_commands.run(["generate", f"--ckpt_dir={tmp_path / 'ckpt'}",
                                     *(f"--prompt={p}" for p in prompts), "--max_new_tokens=12"])
    assert generated.returncode == 0, generated.stderr[-2000:]
    expected = generated.stdout.splitlines()
    assert [generator(p, max_new_tokens=12)[0]["generated_text"] for p in prompts] == expected
    assert all(len(text) > len(p) for text, p in zip(expected, prompts))


def test_to_hf_exports_without_tensorflow(tmp_path):
    """The tokenizer files come from the vocabulary file itself (here the embedded SentencePiece
    model, rebuilt for tokenizers), without seqio, whose TensorFlow costs ~5 s and ~0.8 GB."""
    random_hf_model().save_pretrained(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert forked_commands.heavy_modules_after(
        "from bloom_jax import convert; "
        f"convert.to_hf({str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'out')!r})") == []
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.fixture
def hf_dir(tmp_path):
    random_hf_model().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    return tmp_path / "hf"


def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.from_hf(tmp_path, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a bloom_jax checkpoint"):
        convert.to_hf(tmp_path, tmp_path / "out")


def test_error_not_bloom(hf_dir):
    edit_config(hf_dir, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2', not 'bloom'"):
        convert.load_hf_checkpoint(hf_dir)


def test_error_missing_shard(hf_dir):
    shard = sorted(hf_dir.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"Shard {shard.name} .* is missing"):
        convert.load_hf_checkpoint(hf_dir)


@pytest.mark.parametrize("damage", [
    lambda data: bytes(b ^ 0xFF for b in data[:16]) + data[16:],  # its header's length
    lambda data: data[:len(data) // 2],  # truncated
])
def test_error_damaged_weight_file_is_named(hf_dir, tmp_path, damage):
    shard = sorted(hf_dir.glob("*.safetensors"))[1]
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ValueError, match=f"Weight file {shard} cannot be read .*: it is damaged "
                                         "or incomplete; download it again"):
        convert.from_hf(hf_dir, tmp_path / "ckpt")


def test_error_missing_tensor(tmp_path):
    tensors = state_dict(random_hf_model())
    del tensors["transformer.h.1.mlp.dense_4h_to_h.bias"]
    random_hf_model().config.save_pretrained(tmp_path)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.dense_4h_to_h.bias is missing"):
        convert.load_hf_checkpoint(tmp_path)


def test_command_line_error_is_one_clear_line(tmp_path):
    result = forked_commands.run(["convert", "from_hf", "--hf_dir", str(tmp_path), "--out_dir",
                                  str(tmp_path / "ckpt")])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not a Hugging")
    assert "Traceback" not in result.stderr


def test_error_shape_does_not_match_config(hf_dir, tmp_path):
    edit_config(hf_dir, vocab_size=80)
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \(1024, 24\), but the "
                                         r"config .* implies \(80, 24\)"):
        convert.from_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_old_config_key_aliases(hf_dir):
    fields = json.loads((hf_dir / "config.json").read_text())
    renamed = {"n_embed": fields.pop("hidden_size"), "num_attention_heads": fields.pop("n_head"),
               "num_hidden_layers": fields.pop("n_layer")}
    (hf_dir / "config.json").write_text(json.dumps({**fields, **renamed}))
    config, _ = convert.load_hf_checkpoint(hf_dir)
    assert (config.hidden_size, config.n_head, config.n_layer) == (24, 6, 2)


def test_error_checkpoint_config_differs(hf_dir, tmp_path):
    config = convert.from_hf(hf_dir, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="n_layer: checkpoint 2 vs asked 3"):
        param_store.load_params(tmp_path / "ckpt", dataclasses.replace(config, n_layer=3))


def test_error_untied_lm_head(hf_dir):
    edit_config(hf_dir, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        convert.load_hf_checkpoint(hf_dir)


def test_error_output_directory_not_empty(hf_dir, tmp_path):
    convert.from_hf(hf_dir, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="is not empty"):
        convert.from_hf(hf_dir, tmp_path / "ckpt")


def test_error_params_do_not_match_config(hf_dir, tmp_path):
    config, params = convert.load_hf_checkpoint(hf_dir)
    params["ln_f"]["scale"] = params["ln_f"]["scale"][:3]
    with pytest.raises(ValueError, match=r"\['ln_f'\]\['scale'\]: expected \(24,\), found \(3,\)"):
        param_store.save_params(tmp_path / "ckpt", config, params)


def peak_anonymous_mb(*args):
    """Peak anonymous (non file-backed) resident memory of a `bloom_jax.convert` run, in MB.

    File-backed pages of memory-mapped weights are excluded: the kernel reclaims them at will.
    MALLOC_ARENA_MAX keeps glibc's per-thread arenas from hoarding freed slabs.
    """
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    process = subprocess.Popen([sys.executable, "-m", "bloom_jax.convert", *map(str, args)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max([peak] + [int(line.split()[1]) for line in status.splitlines()
                                 if line.startswith("RssAnon:")])
        time.sleep(0.005)
    assert process.returncode == 0, process.stderr.read()
    return peak / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_memory_does_not_grow_with_depth(tmp_path):
    """Eight more layers (96 MB of weights) must cost far less memory than their data."""
    peaks = {}
    for n_layer in (2, 10):
        hf_dir, ckpt, back = (tmp_path / f"{name}{n_layer}" for name in ("hf", "ckpt", "back"))
        random_hf_model(hidden=512, n_head=8, n_layer=n_layer).save_pretrained(hf_dir)
        peaks["from_hf", n_layer] = peak_anonymous_mb(
            "from_hf", "--hf_dir", hf_dir, "--out_dir", ckpt)
        peaks["to_hf", n_layer] = peak_anonymous_mb(
            "to_hf", "--ckpt_dir", ckpt, "--out_dir", back, "--max_shard_bytes", 2**22)
    added_mb = 8 * 12 * 512**2 * 4 / 2**20
    for direction in ("from_hf", "to_hf"):
        assert peaks[direction, 10] - peaks[direction, 2] < 0.25 * added_mb, peaks
