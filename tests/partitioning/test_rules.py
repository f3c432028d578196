"""The logical-to-mesh rule table and its gin overrides."""

import gin
import pytest

from partitioning.rules import DEFAULT_RULES, logical_axis_rules


def test_defaults_shard_parameters_over_fsdp_and_tensor_and_the_batch_over_both_data_axes():
    rules = dict(logical_axis_rules())
    assert rules["embed"] == "fsdp"
    assert rules["heads"] == rules["mlp"] == rules["vocab"] == "tensor"
    assert rules["activation_batch"] == ("data", "fsdp")
    assert rules["kv"] is rules["qkv"] is None
    assert rules["layers"] == rules["activation_stage"] == "stage"  # pipeline stages
    assert logical_axis_rules() == DEFAULT_RULES


def test_overrides_replace_the_rules_of_their_names_only():
    rules = logical_axis_rules([["embed", None], ["activation_batch", ["data"]]])
    assert rules[:2] == (("embed", None), ("activation_batch", ("data",)))
    assert [r for r in rules if r[0] in ("embed", "activation_batch")] == list(rules[:2])
    assert len(rules) == len(DEFAULT_RULES)


def test_overrides_come_from_gin():
    gin.parse_config('logical_axis_rules.overrides = [("mlp", "fsdp")]')
    assert dict(logical_axis_rules())["mlp"] == "fsdp"


@pytest.mark.parametrize("rule, message", [
    (("embed", "model"), r"names mesh axes \['model'\]"),
    (("embed",), "is a \\(logical_name, mesh_axes\\) pair"),
])
def test_bad_rules_are_explained(rule, message):
    with pytest.raises(ValueError, match=message):
        logical_axis_rules([rule])
