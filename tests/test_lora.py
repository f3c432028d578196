"""LoRA: the adapted model equals Hugging Face peft's LoRA on transformers' BLOOM for the same A
and B; merging equals the adapted model; the optimizer holds state for the adapters only."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

from bloom_jax import convert, lora as lora_lib, optim, param_store, sharded_step
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib
from tests.test_convert import hf_logits, padded_batch, random_hf_model

ALL_MODULES = tuple(lora_lib.MODULES)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, target_modules=ALL_MODULES)


def peft_model(lora, directory, seed=0):
    """A random HF BLOOM saved in `directory`, then wrapped by peft with every lora_A and lora_B
    random (peft starts B at 0)."""
    base = random_hf_model()
    base.save_pretrained(directory)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules))).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model


def adapters_from_peft(model, lora, boxed_params):
    """Our adapter tree holding peft's A and B (transposed, reshaped to the kernel's axes)."""
    shapes = nn.unbox(lora_lib.abstract_adapters(lora, boxed_params))
    weights = {name: p.detach().numpy() for name, p in model.named_parameters()}

    def from_peft(path, shape):
        names = [entry.key for entry in path]  # ["h", "self_attention", "dense", "lora_a"]
        module = ".".join(names[1:-1])
        matrix = "lora_A" if names[-1] == "lora_a" else "lora_B"
        return np.stack([weights[f"base_model.model.transformer.h.{i}.{module}.{matrix}.default."
                                 "weight"].T for i in range(shape.shape[0])]).reshape(shape.shape)
    return jax.tree_util.tree_map_with_path(from_peft, shapes)


def reference(directory, lora):
    """(peft model, our config, base params, adapters, boxed abstract params)."""
    model = peft_model(lora, directory)
    config, base = convert.load_hf_checkpoint(directory)
    boxed = shardings_lib.abstract_params(BloomForCausalLM(config),
                                          jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return model, config, base, adapters_from_peft(model, lora, boxed), boxed


def our_logits(config, base, adapters, lora, ids, mask):
    return np.asarray(lora_lib.apply(BloomForCausalLM(config), lora, base, adapters, ids,
                                     attention_mask=mask))


@pytest.mark.parametrize("targets", [ALL_MODULES, ("query_key_value",), ("dense", "dense_4h_to_h")])
def test_adapted_logits_equal_peft(tmp_path, targets):
    lora = dataclasses.replace(LORA, target_modules=targets)
    model, config, base, adapters, _ = reference(tmp_path, lora)
    ids, mask = padded_batch(config.vocab_size)
    theirs = hf_logits(model, ids, mask)
    diff = np.abs(our_logits(config, base, adapters, lora, ids, mask) - theirs)[mask == 1]
    assert diff.max() <= 1e-5, diff.max()
    plain = np.asarray(BloomForCausalLM(config).apply({"params": base}, ids, attention_mask=mask))
    assert np.abs(plain - theirs)[mask == 1].max() > 1e-2  # the adapters matter


def test_merged_export_equals_the_adapted_model_and_peft_s_merge(tmp_path):
    model, config, base, adapters, _ = reference(tmp_path / "hf", LORA)
    ids, mask = padded_batch(config.vocab_size)
    adapted = our_logits(config, base, adapters, LORA, ids, mask)
    merged = lora_lib.merge(base, adapters, LORA)
    in_memory = BloomForCausalLM(config).apply({"params": merged}, ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(in_memory)[mask == 1], adapted[mask == 1], atol=1e-5)

    convert.from_hf(tmp_path / "hf", tmp_path / "base")
    run = tmp_path / "run" / "checkpoints"  # a LoRA run's checkpoints: adapters only
    param_store.save_config(run, config)
    lora_lib.save_config(run, LORA)
    with ocp.CheckpointManager(run) as manager:
        manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(adapters)))
    with pytest.raises(ValueError, match="holds LoRA adapters, not a whole model"):
        param_store.load_params(tmp_path / "run")
    convert.to_hf(tmp_path / "base", tmp_path / "export", lora_dir=tmp_path / "run")

    exported = transformers.BloomForCausalLM.from_pretrained(tmp_path / "export").eval()
    merged_by_peft = model.merge_and_unload()
    for reference_logits in (adapted, hf_logits(merged_by_peft, ids, mask)):
        diff = np.abs(hf_logits(exported, ids, mask) - reference_logits)[mask == 1]
        assert diff.max() <= 1e-5, diff.max()


def test_lora_dropout_acts_on_the_adapter_input_only(tmp_path):
    lora = dataclasses.replace(LORA, dropout=0.5)
    _, config, base, adapters, _ = reference(tmp_path, lora)
    ids, mask = padded_batch(config.vocab_size)
    model = BloomForCausalLM(config)
    key = jax.random.PRNGKey(0)
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == "lora_b" else x, adapters)
    plain = model.apply({"params": base}, ids, attention_mask=mask)
    # With B = 0 the adapters add nothing, dropped or not: the base's dropout is off (0.0). Equal
    # but for the last bits of two programs that fuse the same ops differently (conftest.py).
    np.testing.assert_allclose(
        lora_lib.apply(model, lora, base, zero_b, ids, attention_mask=mask, rng=key), plain,
        rtol=1e-5, atol=1e-5)
    dropped = lora_lib.apply(model, lora, base, adapters, ids, attention_mask=mask, rng=key)
    assert np.abs(np.asarray(dropped) - our_logits(config, base, adapters, lora, ids, mask)
                  ).max() > 1e-3


def test_optimizer_state_is_the_adapters_adam_moments():
    config = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)
    ramp = optim.BatchRampUp(global_batch_size=4, start=4)
    mesh = mesh_lib.create_mesh(devices=jax.devices()[:1])
    rules = rules_lib.logical_axis_rules()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    full = sharded_step.shard_training(
        sharded_step.Workload(config, sequence_length=16, batch_ramp=ramp), mesh, rules)
    adapted = sharded_step.shard_training(
        sharded_step.Workload(config, sequence_length=16, batch_ramp=ramp, lora=LORA), mesh, rules)
    state = adapted.abstract_state
    # Adam's mu and nu per adapter parameter, plus a few scalars (count, learning rate).
    assert abs(nbytes(state.opt_state) - 2 * nbytes(state.params)) <= 64
    assert jax.tree.structure(adapted.abstract_base) == jax.tree.structure(
        full.abstract_state.params)
    assert nbytes(state.opt_state) < nbytes(full.abstract_state.opt_state) / 10


def test_resuming_with_other_adapters_is_refused_naming_both(tmp_path):
    lora_lib.check_resumable(tmp_path, LORA, has_steps=False)  # a new run
    lora_lib.check_resumable(tmp_path, None, has_steps=True)  # a whole model's run
    with pytest.raises(ValueError, match=r"no LoRA \(whole model\), but this run asks for "
                                         r"LoraConfig\(rank=4"):
        lora_lib.check_resumable(tmp_path, LORA, has_steps=True)
    lora_lib.save_config(tmp_path, LORA)
    lora_lib.check_resumable(tmp_path, LORA, has_steps=True)
    other = dataclasses.replace(LORA, rank=8, target_modules=("dense",))
    with pytest.raises(ValueError, match=r"rank=4.*asks for LoraConfig\(rank=8.*\('dense',\)"):
        lora_lib.check_resumable(tmp_path, other, has_steps=True)
    with pytest.raises(ValueError, match="asks for no LoRA"):
        lora_lib.check_resumable(tmp_path, None, has_steps=True)
