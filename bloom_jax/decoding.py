"""Text generation with BLOOM on a device mesh: batched, key/value cached, greedy or sampled.

The prompt is prefilled in one forward pass that fills the cache; each new token is then one
cached step. A `Generator` jits both for one model on one mesh: parameters laid out as training
lays them (`sharded_step.param_shardings`), prompts split by rows over the data-parallel devices
(`data` x `fsdp`), the cache over them by batch and over `tensor` by heads. `generate` runs the
whole decode in one `jax.lax.while_loop`; `start` and `advance` step it, for a caller that
streams tokens as they come (the server). Greedy output is token for token that of Hugging
Face's `generate` (left-padded prompts included: ALiBi positions skip the padding, as there).

Sampling settings and seeds are per row, so requests with different settings share a batch, and
a row's draws depend only on its own seed, never on the rows beside it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bloom_jax import sharded_step
from bloom_jax.model import BloomConfig, BloomForCausalLM, unstack_layers
from partitioning import shardings as shardings_lib
from partitioning.mesh import create_mesh
from partitioning.rules import Rules, logical_axis_rules

Array = jax.Array

# BLOOM's special ids (its tokenizer.json): end of sequence and padding.
EOS_ID = 2
PAD_ID = 3

# Decoding on CPU multiplies a few rows (the batch) by each weight matrix. There, XLA's YNN
# fusions are slower than its Eigen dots (8 x 1024 x 4096: 4.2 ms vs 2.1 ms), so they are off;
# but Eigen is slow at the tied head's `hidden @ embedding.T`, which it computes by copying the
# embedding transposed at every token (8 x 1024 x 250880: 1054 ms vs 112 ms untransposed), so
# decoding on CPU keeps a copy of the embedding laid out [embed, vocab] under HEAD_COPY.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
HEAD_COPY = "lm_head"


class RowSampling(NamedTuple):
    """Sampling settings of each row of a batch (see `Sampling`): three [batch] arrays."""

    temperature: Any  # float32; 0 takes the argmax
    top_k: Any  # int32; 0 keeps every token
    top_p: Any  # float32; 1.0 keeps every token


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

    def rows(self, batch: int) -> RowSampling:
        return stack_sampling([self] * batch)

    def filter(self, logits: Array) -> Array:
        """Scaled logits with the tokens outside top_k and top_p set to -inf: [batch, vocab]."""
        return filter_logits(logits, self.rows(logits.shape[0]))


def stack_sampling(samplings: Sequence[Sampling]) -> RowSampling:
    """One row of settings per `Sampling`, as host arrays."""
    return RowSampling(np.asarray([s.temperature for s in samplings], np.float32),
                       np.asarray([s.top_k for s in samplings], np.int32),
                       np.asarray([s.top_p for s in samplings], np.float32))


def sampling_from(temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None) -> Sampling:
    """Greedy when no argument is given; otherwise sampling, at temperature 1.0 by default."""
    if temperature is None and top_k is None and top_p is None:
        return Sampling()
    return Sampling(temperature=1.0 if temperature is None else float(temperature),
                    top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p))


def filter_logits(logits: Array, rows: RowSampling) -> Array:
    """Each row's logits [batch, vocab] over its temperature, with the tokens outside its top_k
    and top_p set to -inf (greedy rows are scaled by 1)."""
    vocab = logits.shape[-1]
    temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    logits = logits.astype(jnp.float32) / temperature
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.where((rows.top_k > 0) & (rows.top_k < vocab), rows.top_k, vocab)[:, None]
    kth_largest = jnp.take_along_axis(descending, k - 1, axis=-1)
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    descending = jnp.where(descending < kth_largest, -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    top_p = rows.top_p[:, None]
    # The least likely token still needed to reach top_p (the most likely one always is).
    smallest_kept = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf),
                            axis=-1, keepdims=True)
    smallest_kept = jnp.where(top_p < 1, smallest_kept, -jnp.inf)
    return jnp.where(logits < smallest_kept, -jnp.inf, logits)


def choose(logits: Array, rows: RowSampling, keys: Array) -> Array:
    """Next token ids [batch] from logits [batch, vocab], one key per row."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, rows))
        return jnp.where(rows.temperature > 0, drawn.astype(jnp.int32), greedy)
    return jax.lax.cond(jnp.any(rows.temperature > 0), sample, lambda: greedy)


def row_keys(seeds: Sequence[int], rows: Sequence[int]) -> np.ndarray:
    """Key data [batch, 2] of row `rows[i]` of a prompt batch seeded `seeds[i]`."""
    return np.asarray(_row_key_data(np.asarray(seeds, np.uint32), np.asarray(rows, np.uint32)))


@jax.jit  # one dispatch: op by op, it took longer than a whole tiny model's decode
def _row_key_data(seeds: Array, rows: Array) -> Array:
    keys = jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)
    return jax.random.key_data(keys)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a decode is compiled for: new tokens per row, and the ids that stop and pad rows."""

    max_new_tokens: int
    eos_token_id: int | None = EOS_ID  # None: rows never stop early
    pad_token_id: int = PAD_ID


class DecodeState(NamedTuple):
    """A batch part way through decoding."""

    step: Array  # () tokens chosen so far
    token: Array  # [batch] the last token chosen
    done: Array  # [batch] whether the row has stopped (its later tokens are padding)
    new_tokens: Array  # [batch, max_new_tokens] chosen so far, padding after
    cache: Any  # the model's "cache" collection, each layer's keys and values apart
    keys: Array  # [batch] each row's key
    sampling: RowSampling


def _cache_axes(model: BloomForCausalLM) -> Any:
    """The logical axis names of the decoding cache's leaves, as a decode step returns them
    (split per layer; `init` stacks them): a tree of PartitionSpecs."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    init = functools.partial(model.init, decode=True)
    axes = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0), ids)["cache"])
    layer = jax.tree.map(lambda spec: PartitionSpec(*spec[1:]), axes["h"],
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {**axes, "h": (layer,) * model.config.n_layer}


def _forward(model: BloomForCausalLM, params: Any, ids: Array, mask: Array,
             cache: Any) -> tuple[Array, Any]:
    """The last position's logits [batch, vocab] and the cache with `ids` appended, kept
    sharded by batch and heads. Only the last position goes through the LM head: a prompt's
    other logits would cost 2 x length x embed x vocab FLOPs and their memory for nothing
    (BLOOM-560M, 8 prompts of 32 tokens: 131 GFLOP and 257 MB)."""
    hidden, variables = model.apply({"params": params, "cache": cache}, ids, mask,
                                    decode=True, head=False, mutable=["cache"])
    cache = jax.tree.map(nn.with_logical_constraint, variables["cache"], _cache_axes(model))
    return _tied_head(model.config, params, hidden[:, -1]), cache


def _tied_head(config: BloomConfig, params: Any, hidden: Array) -> Array:
    """Logits [batch, vocab] of final hidden states [batch, embed], through the word embeddings
    (as `nn.Embed.attend`), or through their [embed, vocab] copy where params hold one."""
    weights = (params[HEAD_COPY] if HEAD_COPY in params
               else params["word_embeddings"]["embedding"].T)
    logits = jnp.dot(hidden.astype(config.dtype), weights.astype(config.dtype))
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_vocab"))


def _chosen(state: DecodeState, logits: Array, limits: Limits) -> DecodeState:
    """`state` with the token chosen from `logits` appended, or padding on stopped rows."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, state.step)
    token = jnp.where(state.done, limits.pad_token_id, choose(logits, state.sampling, keys))
    done = state.done
    if limits.eos_token_id is not None:
        done = done | (token == limits.eos_token_id)
    return state._replace(step=state.step + 1, token=token, done=done,
                          new_tokens=state.new_tokens.at[:, state.step].set(token))


def _start(model: BloomForCausalLM, limits: Limits, params: Any, prompt_ids: Array,
           attention_mask: Array, key_data: Array, sampling: RowSampling) -> DecodeState:
    """Prefills the cache with the prompts and chooses the first new token."""
    batch, prompt_len = prompt_ids.shape
    # The last new token is never fed back, so the cache holds one token less than the output.
    empty = jnp.zeros((batch, prompt_len + limits.max_new_tokens - 1), jnp.int32)
    # An empty cache; jit drops the parameter initialization that comes with it.
    cache = nn.unbox(model.init(jax.random.key(0), empty, decode=True)["cache"])
    logits, cache = _forward(model, params, prompt_ids, attention_mask, cache)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), token=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        new_tokens=jnp.full((batch, limits.max_new_tokens), limits.pad_token_id, jnp.int32),
        cache=cache, keys=jax.random.wrap_key_data(key_data), sampling=sampling)
    return _chosen(state, logits, limits)


def _advance(model: BloomForCausalLM, limits: Limits, params: Any,
             state: DecodeState) -> DecodeState:
    """Feeds the last token back and chooses the next."""
    batch = state.token.shape[0]
    logits, cache = _forward(model, params, state.token[:, None],
                             jnp.ones((batch, 1), jnp.int32), state.cache)
    return _chosen(state._replace(cache=cache), logits, limits)


def _generate(model: BloomForCausalLM, limits: Limits, params: Any, prompt_ids: Array,
              attention_mask: Array, key_data: Array, sampling: RowSampling) -> Array:
    """Prefill, then one cached step per token until every row has stopped:
    [batch, prompt_len + max_new_tokens]. Stacked layer weights are split apart once, here, not
    sliced out of their stack at every token (`put_params` splits them once for every call)."""
    params = {**params, "h": unstack_layers(params["h"], model.config.n_layer)}
    state = _start(model, limits, params, prompt_ids, attention_mask, key_data, sampling)
    state = jax.lax.while_loop(
        lambda s: (s.step < limits.max_new_tokens) & ~jnp.all(s.done),
        functools.partial(_advance, model, limits, params), state)
    return jnp.concatenate([prompt_ids, state.new_tokens], axis=1)


@dataclasses.dataclass(frozen=True)
class Generator:
    """Generation jitted for one model on one mesh, with the shardings of what it consumes.

    Batches of any size are padded with copies of their first row to a multiple of the
    data-parallel devices (`rows_multiple`); the copies are decoded and dropped.
    """

    config: BloomConfig
    mesh: jax.sharding.Mesh
    rules: Rules

    @functools.cached_property
    def model(self) -> BloomForCausalLM:
        return BloomForCausalLM(self.config)

    @functools.cached_property
    def param_shardings(self) -> Any:
        return sharded_step.param_shardings(self.model, self.mesh, self.rules)

    @property
    def rows_multiple(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def on_cpu(self) -> bool:
        return self.mesh.devices.flat[0].platform == "cpu"

    @functools.cached_property
    def decode_param_shardings(self) -> Any:
        """`param_shardings` with the layer stack split into one tree per layer (and, on CPU, the
        head's copy of the embedding, sharded as its transpose)."""
        layer = jax.tree.map(lambda s: NamedSharding(self.mesh, PartitionSpec(*s.spec[1:])),
                             self.param_shardings["h"])
        shardings = {**self.param_shardings, "h": (layer,) * self.config.n_layer}
        if self.on_cpu:
            embedding = self.param_shardings["word_embeddings"]["embedding"].spec
            shardings[HEAD_COPY] = NamedSharding(self.mesh, PartitionSpec(*reversed(embedding)))
        return shardings

    def _decode_params(self, params: Any) -> Any:
        """`params` with the layer stack split into one tree per layer (a decode step would
        otherwise slice, i.e. copy, every layer's weights), and on CPU the head's copy added."""
        split = {**params, "h": unstack_layers(params["h"], self.config.n_layer)}
        if self.on_cpu and HEAD_COPY not in split:
            split[HEAD_COPY] = split["word_embeddings"]["embedding"].T
        return split

    def put_params(self, params: Any) -> Any:
        """`params` laid out on the mesh as training lays them out, but as decoding reads them
        (`_decode_params`), once, here; params it gave already come back as they are."""
        return jax.device_put(self._decode_params(params), self.decode_param_shardings)

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        """Of [batch, ...] arrays of `ndim` axes: rows over the data-parallel devices."""
        rows = shardings_lib.batch_sharding(self.mesh, self.rules).spec[0]
        return NamedSharding(self.mesh, PartitionSpec(rows, *([None] * (ndim - 1))))

    def put_rows(self, arrays: Any) -> Any:
        """Host arrays [batch, ...] padded to `rows_multiple` rows and split over the mesh."""
        def put(x):
            x = np.asarray(x)
            extra = -x.shape[0] % self.rows_multiple
            x = np.concatenate([x, np.repeat(x[:1], extra, axis=0)])
            return jax.device_put(x, self._batch_sharding(x.ndim))
        return jax.tree.map(put, arrays)

    @functools.cached_property
    def _start(self) -> sharded_step.MeshFunction:
        return self._jit(_start)

    @functools.cached_property
    def _advance(self) -> sharded_step.MeshFunction:
        return self._jit(_advance, donate_argnums=2)  # the state

    @functools.cached_property
    def _generate(self) -> sharded_step.MeshFunction:
        return self._jit(_generate)

    def _jit(self, fn, **kwargs) -> sharded_step.MeshFunction:
        """`fn(model, limits, ...)` jitted on the mesh, `limits` static."""
        jitted = jax.jit(functools.partial(fn, self.model), static_argnums=0,
                         compiler_options=CPU_DECODE_OPTIONS if self.on_cpu else None, **kwargs)
        return sharded_step.MeshFunction(jitted, self.mesh, self.rules)

    def start(self, limits: Limits, params: Any, prompt_ids: Any, attention_mask: Any,
              key_data: Any, sampling: RowSampling) -> DecodeState:
        """The prompts prefilled and their first tokens chosen (host arrays in; rows padded)."""
        return self._start(limits, params, *self.put_rows(
            (prompt_ids, attention_mask, key_data, sampling)))

    def advance(self, limits: Limits, params: Any, state: DecodeState) -> DecodeState:
        """One more token per row (`state` is consumed)."""
        return self._advance(limits, params, state)

    def generate(self, limits: Limits, params: Any, prompt_ids: Any, attention_mask: Any,
                 key_data: Any, sampling: RowSampling) -> np.ndarray:
        """The prompts followed by their new ids: [batch, prompt_len + max_new_tokens]."""
        out = self._generate(limits, params, *self.put_rows(
            (prompt_ids, attention_mask, key_data, sampling)))
        return np.asarray(out)[:len(prompt_ids)]

    def compile(self, limits: Limits, batch: int, prompt_len: int) -> sharded_step.MeshFunction:
        """`generate` compiled for a batch shape on abstract arrays (nothing is allocated), e.g.
        to read its per-device memory: `.fn.memory_analysis()`."""
        stacked = nn.unbox(shardings_lib.abstract_params(
            self.model, jax.ShapeDtypeStruct((1, 1), jnp.int32)))
        split = jax.eval_shape(self._decode_params, stacked)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              split, self.decode_param_shardings)
        batch += -batch % self.rows_multiple

        def rows(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self._batch_sharding(len(shape)))
        ids = rows((batch, prompt_len), jnp.int32)
        sampling = RowSampling(rows((batch,), jnp.float32), rows((batch,), jnp.int32),
                               rows((batch,), jnp.float32))
        return self._generate.lower(limits, params, ids, ids, rows((batch, 2), jnp.uint32),
                                    sampling).compile()


@functools.lru_cache(maxsize=16)
def generator(config: BloomConfig, mesh: jax.sharding.Mesh | None = None,
              rules: Rules | None = None) -> Generator:
    """The Generator of `config` on `mesh` (default: the first device) with `rules` (default:
    training's); one per arguments, so each compiles once."""
    mesh = mesh or create_mesh(1, 1, 1, devices=jax.devices()[:1])
    return Generator(config, mesh, rules or logical_axis_rules())


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
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> np.ndarray:
    """The prompts followed by `max_new_tokens` generated ids: [batch, prompt_len + max_new_tokens].

    prompt_ids: [batch, prompt_len] ints; attention_mask: [batch, prompt_len], 0 on left padding
    (default: no padding). Decoding is greedy unless temperature, top_k or top_p is given (see
    `Sampling`); seed fixes the draws. A row stops at its first eos_token_id and is filled with
    pad_token_id after it, as Hugging Face's `generate` does; eos_token_id=None never stops.
    mesh, rules: where to run (default: one device; see `generator`); the output does not depend
    on them. Params are laid out for decoding at every call (`Generator.put_params`: 80 ms for a
    100 MB model on CPU); a caller that loops lays them out once, with `generator(config)`'s
    `put_params`, and passes those, which are kept as they are.
    """
    prompt_ids = np.asarray(prompt_ids)
    attention_mask = checked_mask(config, prompt_ids, attention_mask)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative.")
    if max_new_tokens == 0:
        return prompt_ids.astype(np.int32)
    batch = len(prompt_ids)
    run = generator(config, mesh, rules)
    return run.generate(Limits(max_new_tokens, eos_token_id, pad_token_id),
                        run.put_params(params), prompt_ids.astype(np.int32), attention_mask,
                        row_keys([seed] * batch, range(batch)),
                        sampling_from(temperature, top_k, top_p).rows(batch))


def checked_mask(config: BloomConfig, prompt_ids: np.ndarray, attention_mask: Any) -> np.ndarray:
    """The prompts' attention mask (all ones by default), after checking ids and padding."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0 or prompt_ids.dtype.kind not in "iu":
        raise ValueError(f"prompt_ids must be integer ids of shape [batch, prompt_len >= 1], got "
                         f"{prompt_ids.dtype} {prompt_ids.shape}; wrap a single prompt as [ids].")
    if prompt_ids.min() < 0 or prompt_ids.max() >= config.vocab_size:
        raise ValueError(f"prompt_ids hold ids outside [0, {config.vocab_size}), the model's "
                         "vocabulary; was the prompt encoded with this model's tokenizer?")
    if attention_mask is None:
        return np.ones_like(prompt_ids, np.int32)
    mask = np.asarray(attention_mask)
    if mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, prompt_ids {prompt_ids.shape}; "
                         "give one 0/1 entry per prompt token.")
    if not np.all(mask[:, -1] == 1) or np.any(np.diff(mask, axis=1) < 0):
        raise ValueError("attention_mask must pad on the left (zeros, then ones up to the last "
                         "column): new tokens are appended after the last column.")
    return mask.astype(np.int32)


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): batch shapes that reuse a few compiles."""
    return 1 << max(0, n - 1).bit_length()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as one left-padded batch: (ids, attention_mask), both [batch, longest]."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask
