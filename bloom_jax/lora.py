"""LoRA: low-rank adapters on BLOOM's attention and MLP projections, the base frozen.

A targeted projection y = x W + b becomes y = x W + b + (alpha / rank) dropout(x) A B, with A
[in, rank] and B [rank, out] (Hugging Face `peft`'s lora_A and lora_B, transposed), A drawn as
peft draws it and B zero, so training starts from the base model.

The adapters are their own parameter tree, shaped like the parameters they adapt: for each
targeted module, `lora_a` [layers, ...in, rank] and `lora_b` [layers, rank, ...out] next to its
`kernel`. They are applied by intercepting the targeted modules' calls (`nn.intercept_methods`),
so the model's code is untouched; the path through A and B is computed on the activations, as
peft does, so LoRA dropout acts on the adapter's input only and no full-size update of W is ever
formed in training. `merge` folds them into the kernels for export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax import param_store
from bloom_jax import step as step_lib
from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import shardings as shardings_lib

# Targetable modules (peft's target_modules names for BLOOM) -> their path in the parameter tree
# and how many leading axes of their kernel are its input.
MODULES = {
    "query_key_value": (("h", "self_attention", "query_key_value"), 1),
    "dense": (("h", "self_attention", "dense"), 2),
    "dense_h_to_4h": (("h", "mlp", "dense_h_to_4h"), 1),
    "dense_4h_to_h": (("h", "mlp", "dense_4h_to_h"), 1),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha, dropout and target modules of the adapters (peft's LoraConfig fields).

    Gin: `Workload.lora = @LoraConfig()`, `LoraConfig.rank = 16`, `LoraConfig.target_modules =
    ('query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h')`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query_key_value",)

    def __post_init__(self):
        targets = self.target_modules
        object.__setattr__(self, "target_modules",
                           (targets,) if isinstance(targets, str) else tuple(targets))
        unknown = sorted(set(self.target_modules) - set(MODULES))
        if unknown or not self.target_modules:
            raise ValueError(f"LoraConfig.target_modules = {self.target_modules}: "
                             f"{unknown or 'none'} is not a BLOOM projection; choose among "
                             f"{sorted(MODULES)}.")
        if self.rank < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig needs rank >= 1 and 0 <= dropout < 1; got rank="
                             f"{self.rank}, dropout={self.dropout}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _copy(tree: Any) -> Any:
    """New dicts all the way down, sharing the leaves."""
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _adapter_paths(lora: LoraConfig) -> list[tuple[tuple[str, ...], int]]:
    return [MODULES[name] for name in lora.target_modules]


def abstract_adapters(lora: LoraConfig, boxed_params: Any) -> dict:
    """The adapter tree as shapes, boxed with the logical axes of the kernels they adapt (the rank
    axis unsharded), from the model's boxed abstract parameters."""
    tree: dict = {}
    for path, n_in in _adapter_paths(lora):
        kernel = _get(boxed_params, path)["kernel"]
        shape, names = kernel.value.shape, kernel.names
        layers, inputs, outputs = shape[:1], shape[1:1 + n_in], shape[1 + n_in:]
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        for leaf, leaf_shape, leaf_names in (
                ("lora_a", (*layers, *inputs, lora.rank), (*names[:1 + n_in], None)),
                ("lora_b", (*layers, lora.rank, *outputs), (names[0], None, *names[1 + n_in:]))):
            node[leaf] = nn.Partitioned(jax.ShapeDtypeStruct(leaf_shape, jnp.float32), leaf_names)
    return tree


def init_adapters(lora: LoraConfig, boxed_params: Any, key: jax.Array) -> dict:
    """Fresh adapters: A uniform in +-1/sqrt(fan_in) (peft's kaiming_uniform_(a=sqrt(5))), B 0."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(
        nn.unbox(abstract_adapters(lora, boxed_params)))

    def init(i, path, x):
        if path[-1].key == "lora_b":
            return jnp.zeros(x.shape, x.dtype)
        bound = 1 / math.sqrt(math.prod(x.shape[1:-1]))  # fan_in: the kernel's input size
        return jax.random.uniform(jax.random.fold_in(key, i), x.shape, x.dtype, -bound, bound)
    return jax.tree.unflatten(tree, [init(i, path, x) for i, (path, x) in enumerate(leaves)])


def _interceptor(lora: LoraConfig, rng: jax.Array | None):
    """Adds the low-rank path to every module call that has adapters among its parameters."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not module.has_variable("params", "lora_a"):
            return next_fun(*args, **kwargs)
        x = args[0]
        a = module.get_variable("params", "lora_a")  # [...in, rank] (this layer's)
        b = module.get_variable("params", "lora_b")  # [rank, ...out]
        if rng is not None and lora.dropout > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1 - lora.dropout), 0)
        low = jnp.tensordot(x, a.astype(module.dtype), axes=a.ndim - 1)  # [batch, length, rank]
        update = jnp.tensordot(low, b.astype(module.dtype), axes=1)
        return next_fun(*args, **kwargs) + (lora.scale * update).astype(module.dtype)
    return intercept


def _with_adapters(base: Any, adapters: Any) -> Any:
    """The base tree with each adapted module's lora_a and lora_b added beside its kernel."""
    if not isinstance(adapters, dict):
        return adapters
    return {**base, **{k: _with_adapters(base.get(k, {}), v) for k, v in adapters.items()}}


def apply(model: BloomForCausalLM, lora: LoraConfig, base: Any, adapters: Any, *args,
          rng: jax.Array | None = None, **kwargs) -> jax.Array:
    """`model.apply` with the adapters on; `rng` turns on the model's and LoRA's dropout."""
    rngs = None if rng is None else {"dropout": rng}
    with nn.intercept_methods(_interceptor(lora, rng)):
        return model.apply({"params": _with_adapters(base, adapters)}, *args,
                           deterministic=rng is None, rngs=rngs, **kwargs)


def loss_sums(model: BloomForCausalLM, lora: LoraConfig, base: Any, adapters: Any,
              batch: step_lib.Batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed token losses, summed loss weights) of a packed batch with the adapters on: the
    plain model's loss, run with the low-rank path intercepting the adapted modules."""
    with nn.intercept_methods(_interceptor(lora, rng)):
        return step_lib.loss_sums(model, _with_adapters(base, adapters), batch, rng)


def make_train_step(model: BloomForCausalLM, lora: LoraConfig, optimizer,
                    skip_policy: step_lib.SkipPolicy = step_lib.SkipPolicy()):
    """The train step of the adapters: (state, batch, batch_size, base) -> (state, metrics);
    `state.params` are the adapters, `base` the frozen parameters (no gradient, no state)."""
    use_dropout = lora.dropout > 0 or step_lib.uses_dropout(model.config)

    def step(state, batch, batch_size, base):
        loss = lambda adapters, micro, rng: loss_sums(model, lora, base, adapters, micro, rng)
        return step_lib.train_step(state, batch, batch_size, loss=loss, use_dropout=use_dropout,
                                   optimizer=optimizer, skip_policy=skip_policy)
    return step


def delta(a: Any, b: Any, scale: float) -> Any:
    """scale x A B per layer, shaped like the kernel: a [layers, ...in, r], b [layers, r, ...out]
    (numpy or jax arrays)."""
    layers, rank = a.shape[0], a.shape[-1]
    product = a.reshape(layers, -1, rank) @ b.reshape(layers, rank, -1)
    return scale * product.reshape(*a.shape[:-1], *b.shape[2:])


def merge(base: Any, adapters: Any, lora: LoraConfig) -> Any:
    """The base parameters with each adapted kernel replaced by W + (alpha / rank) A B."""
    merged = _copy(base)
    for path, _ in _adapter_paths(lora):
        module, pair = _get(merged, path), _get(adapters, path)
        kernel = module["kernel"]
        module["kernel"] = (kernel + delta(pair["lora_a"], pair["lora_b"], lora.scale)
                            ).astype(kernel.dtype)
    return merged


@dataclasses.dataclass(frozen=True)
class MergedKernel:
    """A base kernel (array or unread tensorstore) plus its adapters' update, read layer by layer
    as `kernel[(i,)]`, so a merged export streams like a plain one."""

    base: Any
    a: np.ndarray
    b: np.ndarray
    scale: float

    def __getitem__(self, index: tuple) -> np.ndarray:
        (layer,) = index
        base = self.base[index]
        base = np.asarray(base.read().result() if hasattr(base, "read") else base)
        update = delta(self.a[layer:layer + 1], self.b[layer:layer + 1], self.scale)[0]
        return (base.astype(np.float32) + update).astype(base.dtype)


def merged_for_export(base: Any, adapters: Any, lora: LoraConfig) -> Any:
    """`base` (e.g. `param_store.open_params`'s tensorstores) with each adapted kernel a
    `MergedKernel`, for `convert`'s layer-by-layer writer."""
    merged = _copy(base)
    for path, _ in _adapter_paths(lora):
        pair = jax.tree.map(np.asarray, _get(adapters, path))
        module = _get(merged, path)
        module["kernel"] = MergedKernel(module["kernel"], pair["lora_a"], pair["lora_b"],
                                        lora.scale)
    return merged


def save_config(directory: str | Path, lora: LoraConfig) -> None:
    """Writes `lora.json` beside a run's checkpoints: they hold adapters, not a whole model."""
    text = json.dumps(dataclasses.asdict(lora), indent=2) + "\n"
    (Path(directory) / param_store.ADAPTERS_FILE).write_text(text)


def check_resumable(directory: str | Path, lora: LoraConfig | None, has_steps: bool) -> None:
    """Refuses to resume a run's checkpoints (`directory`) with other adapters than they hold:
    another LoraConfig, LoRA on a whole model's steps, or a whole model on adapters' steps."""
    path = Path(directory) / param_store.ADAPTERS_FILE
    saved = LoraConfig(**json.loads(path.read_text())) if path.is_file() else None
    if saved == lora or (saved is None and not has_steps):
        return
    describe = lambda c: "no LoRA (whole model)" if c is None else (
        f"LoraConfig(rank={c.rank}, alpha={c.alpha}, dropout={c.dropout}, "
        f"target_modules={c.target_modules})")
    raise ValueError(f"{directory} holds checkpoints of {describe(saved)}, but this run asks for "
                     f"{describe(lora)}; resume with the saved settings (Workload.lora, "
                     "LoraConfig.*) or use a new MODEL_DIR.")


def load_adapters(directory: str | Path, config: BloomConfig) -> tuple[LoraConfig, Any]:
    """The LoRA config and the latest adapters of a LoRA run (its MODEL_DIR or checkpoints/)
    for a base of `config`, in host memory."""
    directory = param_store.checkpoint_dir(directory)
    path = directory / param_store.ADAPTERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {param_store.ADAPTERS_FILE}: it is not the "
                                "checkpoint directory of a LoRA run (Workload.lora).")
    lora = LoraConfig(**json.loads(path.read_text()))
    param_store.checkpoint_config(directory, config, fix="give the base the adapters were "
                                  "trained on")
    boxed = shardings_lib.abstract_params(BloomForCausalLM(config),
                                          jax.ShapeDtypeStruct((1, 1), jnp.int32))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                          nn.unbox(abstract_adapters(lora, boxed)))
    return lora, param_store.restore_params(directory, target)
