"""Instruction data: loss on targets only, packing with document masking, exact resume."""

import json

import numpy as np
import pytest

from bloom_jax.data import instructions, vocabularies

LENGTH = 96


def write_examples(path, examples, extra_lines=()):
    lines = [json.dumps({"inputs": i, "targets": t}, ensure_ascii=False) for i, t in examples]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return path


EXAMPLES = [(f"Question {k}: what follows {k}?", f" The answer is {k + 1}.") for k in range(40)]


@pytest.fixture(scope="module")
def vocabulary():
    return vocabularies.load_vocabulary()


@pytest.fixture
def data(tmp_path):
    return write_examples(tmp_path / "xp3.jsonl", EXAMPLES)


def stream(data, vocabulary, batch_size=4, **kwargs):
    return instructions.make_instruction_stream(
        data=data, vocabulary=vocabulary, sequence_length=LENGTH, batch_size=batch_size, seed=3,
        process_index=0, process_count=1, **kwargs)


def rows_examples(batch):
    """Per row, per segment: (input ids, target ids, loss weights) of that segment."""
    for row in range(len(batch["input_ids"])):
        segments = batch["segment_ids"][row]
        yield [tuple(batch[name][row][segments == s] for name in
                     ("input_ids", "targets", "loss_weights"))
               for s in range(1, segments.max() + 1)]


@pytest.mark.parametrize("packing", [True, False])
def test_only_target_tokens_carry_loss_weight(data, vocabulary, packing):
    batch = next(stream(data, vocabulary, packing=packing))
    by_text = {vocabulary.decode(list(vocabulary.encode(i))): t for i, t in EXAMPLES}
    seen = 0
    for row in rows_examples(batch):
        assert len(row) > 1 if packing else len(row) == 1
        for inputs, targets, weights in row:
            prompt = np.asarray(inputs)[: len(inputs) - int(weights.sum()) + 1]
            expected = by_text[vocabulary.decode(prompt.tolist())]
            # The weighted positions predict exactly the target text and then EOS.
            assert targets[weights == 1].tolist() == [*vocabulary.encode(expected),
                                                      vocabulary.eos_id]
            assert set(weights.tolist()) <= {0.0, 1.0} and weights[-1] == 1
            seen += 1
    assert seen >= 4
    assert (batch["loss_weights"][batch["segment_ids"] == 0] == 0).all()  # padding


def test_norm_target_loss_weighs_every_target_the_same(data, vocabulary):
    """Megatron-DeepSpeed's --norm-target-loss: each target's weights sum to 1, so the batch loss
    (summed weighted losses over summed weights) is the mean over targets of each one's mean
    token loss."""
    plain = next(stream(data, vocabulary))
    normed = next(stream(data, vocabulary, norm_target_loss=True))
    np.testing.assert_array_equal(plain["input_ids"], normed["input_ids"])
    rng = np.random.default_rng(0)
    losses = rng.uniform(0, 5, plain["targets"].shape)
    per_target = []
    for plain_row, normed_row in zip(rows_examples(plain), rows_examples(normed)):
        for (_, _, ones), (_, _, weights) in zip(plain_row, normed_row):
            np.testing.assert_allclose(weights, ones / ones.sum())
            assert weights.sum() == pytest.approx(1.0)
    for row in range(len(losses)):
        for s in range(1, plain["segment_ids"][row].max() + 1):
            scored = (plain["segment_ids"][row] == s) & (plain["loss_weights"][row] == 1)
            per_target.append(losses[row][scored].mean())
    loss = (losses * normed["loss_weights"]).sum() / normed["loss_weights"].sum()
    assert loss == pytest.approx(np.mean(per_target))
    token_mean = (losses * plain["loss_weights"]).sum() / plain["loss_weights"].sum()
    assert abs(loss - token_mean) > 1e-3  # targets of different lengths: not the token mean


def test_packed_examples_are_whole_and_positions_restart(data, vocabulary):
    batch = next(stream(data, vocabulary))
    for row in range(len(batch["input_ids"])):
        segments, positions = batch["segment_ids"][row], batch["positions"][row]
        for s in range(1, segments.max() + 1):
            np.testing.assert_array_equal(positions[segments == s],
                                          np.arange((segments == s).sum()))
        # segments are contiguous, in order, then padding
        used = (segments > 0).sum()
        np.testing.assert_array_equal(segments[:used], np.sort(segments[:used]))
        assert (segments[used:] == 0).all()


def test_resume_continues_with_the_next_batch(data, vocabulary):
    first = stream(data, vocabulary)
    for _ in range(7):  # past an epoch of 40 examples
        next(first)
    resumed = stream(data, vocabulary)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for _ in range(3):
        expected, got = next(first), next(resumed)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


def test_processes_read_their_rows_of_the_global_batch(data, vocabulary):
    whole = next(stream(data, vocabulary))
    halves = [next(instructions.make_instruction_stream(
        data=data, vocabulary=vocabulary, sequence_length=LENGTH, batch_size=4, seed=3,
        process_index=p, process_count=2)) for p in range(2)]
    for name in whole:
        np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), whole[name])


def test_an_example_longer_than_a_row_keeps_its_targets(tmp_path, vocabulary):
    data = write_examples(tmp_path / "long.jsonl", [("word " * 200, " short answer")])
    batch = next(stream(data, vocabulary, batch_size=1))
    weighted = batch["targets"][0][batch["loss_weights"][0] == 1]
    assert weighted.tolist() == [*vocabulary.encode(" short answer"), vocabulary.eos_id]
    assert (batch["segment_ids"][0] == 1).all()


def test_bad_input_is_skipped_counted_or_named(tmp_path, vocabulary, data, caplog):
    mixed = write_examples(tmp_path / "mixed.jsonl", EXAMPLES[:2] + [("no target", "")],
                           extra_lines=["{not json", json.dumps({"inputs": "only inputs"})])
    assert len(instructions.tokenize_examples(mixed, vocabulary)) == 2
    assert ("1 examples with empty targets, 1 malformed JSON lines, 1 records without a inputs "
            "and targets string") in caplog.text
    with pytest.raises(FileNotFoundError, match="SFT_DATA"):
        instructions.tokenize_examples(tmp_path / "missing", vocabulary)
    with pytest.raises(ValueError, match="no usable example"):
        instructions.tokenize_examples(write_examples(tmp_path / "empty.jsonl", [("a", "")]),
                                       vocabulary)
    with pytest.raises(ValueError, match="SFT_DATA is not set"):
        stream(None, vocabulary)
    saved = stream(data, vocabulary).get_state()
    with pytest.raises(ValueError, match="packing=True but this stream has False"):
        stream(data, vocabulary, packing=False).set_state(saved)


def test_held_out_batches_score_every_target_or_every_prompt_once(data, vocabulary):
    streams = instructions.instruction_validation_streams(
        data=data, vocabulary=vocabulary, sequence_length=LENGTH, batch_size=3, process_index=0,
        process_count=1)
    targets, prompts = list(streams["targets"]), list(streams["prompts"])
    assert len(targets) == len(streams["targets"]) > 1
    scored = {"targets": [], "prompts": []}
    for target_batch, prompt_batch in zip(targets, prompts):
        np.testing.assert_array_equal(target_batch["input_ids"], prompt_batch["input_ids"])
        for row in range(len(target_batch["input_ids"])):
            segments = target_batch["segment_ids"][row]
            for s in range(1, segments.max() + 1):
                for part, batch in (("targets", target_batch), ("prompts", prompt_batch)):
                    weights = batch["loss_weights"][row][segments == s]
                    scored[part].append(batch["targets"][row][segments == s][weights == 1])
            assert (target_batch["loss_weights"][row] + prompt_batch["loss_weights"][row] ==
                    (segments > 0)).all()
    # File order, each example once: its prompt (less its first token, predicted by nothing)
    # and its target with EOS.
    assert [vocabulary.decode(t.tolist()) for t in scored["targets"]] == [
        vocabulary.decode([*vocabulary.encode(t), vocabulary.eos_id]) for _, t in EXAMPLES]
    assert [p.tolist() for p in scored["prompts"]] == [vocabulary.encode(i)[1:]
                                                       for i, _ in EXAMPLES]
    assert streams["targets"].num_bytes == sum(
        len(vocabulary.decode(vocabulary.encode(t)).encode()) for _, t in EXAMPLES)
    with pytest.raises(ValueError, match="SFT_EVAL_DATA is not set"):
        instructions.instruction_validation_streams(batch_size=3)
