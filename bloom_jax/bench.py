"""`python -m bloom_jax.bench`: how fast is the real train step, and how does it compare?

Times the trainer's own jitted step (forward, backward, optimizer update; `shard_training`)
on synthetic packed batches of the configured shape, after a warm-up, and reports compile time,
median step time, tokens/s, TFLOP/s per device, MFU (model FLOPs) and HFU (hardware FLOPs: the
remat policy's recomputation counted), by flops.py's formula, the trainer's and the planner's,
the process's page faults per step (huge_pages.py), and the time the checkpoint digests of the
state take (at every save and every restore):

    python -m bloom_jax.bench --gin_file=gin_configs/tiny.gin --steps=10 --compare_torch
    python -m bloom_jax.bench --gin_file=gin_configs/bloom560m_smoke.gin \\
        --sweep BloomConfig.remat_policy=none,full --sweep BloomConfig.scan_layers=True,False

`--compare_torch` times the same model, batch and sequence length as a training step of
Hugging Face's `BloomForCausalLM` with `torch.optim.AdamW` (float32, or bfloat16 autocast when
the config computes in bfloat16), alternating timed steps with ours so that both see the same
machine load (both models are resident at once: the 560M smoke config needs ~13 GB each).
`--sweep NAME=v1,v2` (repeatable) times every combination of the bindings, as
BigScience did before launching BLOOM, and lists the combinations that do not fit (mesh or memory).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bloom_jax import checkpoints, configs, convert, decoding, flops, metrics, sharded_step
from bloom_jax import model as model_lib
from bloom_jax.data import packing
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning import shardings as shardings_lib

FLAGS = flags.FLAGS

# Synthetic rows start a new document at this token (BLOOM's </s>), about twice per row.
SYNTHETIC_EOS_ID = 2
DOCUMENTS_PER_ROW = 2


def define_flags() -> None:
    """The benchmark's own flags (call once, when run as a command; configs.run adds gin's)."""
    flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
    flags.DEFINE_integer("warmup_steps", 2, "Untimed steps run after compilation.")
    flags.DEFINE_integer("seed", 0, "Seed of the parameters and the synthetic tokens.")
    flags.DEFINE_bool("compare_torch", False, "Also time Hugging Face's BloomForCausalLM with "
                      "torch.optim.AdamW on the same batches, alternating steps with ours.")
    flags.DEFINE_bool("json", False, "Print the figures as one JSON object (a list with --sweep).")
    flags.DEFINE_enum("suite", None, ["gpu"], "gpu: BLOOM-560M and BLOOM-1B7 at 2048 tokens in "
                      "bfloat16 on one GPU, with cuDNN's and with XLA's attention; one JSON "
                      "object. Fails at once without a GPU.")
    flags.DEFINE_bool("generate", False, "Time cached greedy decoding (generate_ids) instead of "
                      "the train step: new tokens/s, against Hugging Face's generate on the "
                      "same weights with --compare_torch.")
    flags.DEFINE_integer("generate_batch", 1, "--generate: prompts per batch.")
    flags.DEFINE_integer("prompt_length", 32, "--generate: tokens per prompt.")
    flags.DEFINE_integer("new_tokens", 64, "--generate: new tokens per prompt (no early stop).")
    flags.DEFINE_multi_string("sweep", [], "NAME=v1,v2: benchmark each value of the gin binding "
                              "NAME (repeat for a grid), e.g. MICRO_BATCH_SIZE=1,2 or "
                              "create_mesh.fsdp=1,2; values are split at commas.")


@dataclasses.dataclass(frozen=True)
class Result:
    """The figures of one benchmarked configuration."""

    compile_s: float
    step_time_s: float  # median
    tokens_per_s: float
    num_devices: int
    peak_flops: float  # per device, for the compute dtype (measured on CPUs)
    model_flops_per_step: float  # Megatron's K = 3
    tflops_per_device: float  # model FLOPs
    mfu: float
    hardware_flops_per_step: float  # model FLOPs + the remat policy's recomputation
    hfu: float
    step_peak_bytes: int  # per device: arguments + outputs - donated + temporaries (as plan's)
    peak_host_rss_mb: float  # the process's so far (a sweep's earlier rows and torch included)
    host_page_faults_per_step: float | None = None  # median over our steps (huge_pages.py)
    peak_device_bytes: int | None = None  # None on CPUs, whose memory is the host's
    trained_param_bytes: int = 0  # the parameters the step updates (LoRA: the adapters)
    optimizer_state_bytes: int = 0
    checkpoint_bytes: int | None = None  # the parameters and optimizer state
    digest_s: float | None = None  # median time of their checkpoint digests (save and restore)
    torch_step_time_s: float | None = None
    torch_tokens_per_s: float | None = None
    speedup_vs_torch: float | None = None


def synthetic_batch(rng: np.random.Generator, micro_batches: int, micro_batch: int,
                    length: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Random tokens packed by the data pipeline's own `pack`: [micro_batches, micro_batch, length]
    features with documents (segment ids, restarting positions) of random lengths. Document
    masking exercises the general mask; the step costs the same with BLOOM's one segment per row
    (the mask is built and applied either way)."""
    rows = rng.integers(SYNTHETIC_EOS_ID + 1, vocab_size, (micro_batches * micro_batch, length + 1))
    rows[rng.random(rows.shape) < DOCUMENTS_PER_ROW / length] = SYNTHETIC_EOS_ID
    packed = packing.pack(rows, np.full(len(rows), length), SYNTHETIC_EOS_ID,
                           document_masking=True)
    return {k: v.reshape(micro_batches, micro_batch, length) for k, v in packed.items()}


class JaxStep:
    """Our trainer's step on a synthetic batch, compiled ahead of time for the current mesh."""

    def __init__(self, workload: sharded_step.Workload, seed: int, devices: Any = None):
        mesh = mesh_lib.create_mesh(devices=devices)
        training = sharded_step.shard_training(workload, mesh, rules_lib.logical_axis_rules())
        self.num_devices = mesh.devices.size
        self.host_batch = synthetic_batch(
            np.random.default_rng(seed), training.micro_steps(workload.batch_size),
            training.micro_batch, workload.sequence_length, workload.model_config.vocab_size)
        self._batch = shardings_lib.put_batch(self.host_batch, training.batch_sharding)
        self._batch_size = np.int32(workload.batch_size)
        self._state = training.init_state(seed)
        # LoRA's frozen base: zeros time as any weights do.
        self._base = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding),
                                  training.abstract_args)
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
        self.trained_bytes = nbytes(training.abstract_state.params)
        self.state_bytes = nbytes(training.abstract_state.opt_state)
        start = time.perf_counter()
        self._step = training.step.lower(self._state, self._batch, self._batch_size,
                                         *self._base).compile()
        self.compile_s = time.perf_counter() - start
        self.page_faults = []  # the process's minor page faults during each call
        memory = self._step.fn.memory_analysis()
        self.peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)

    def __call__(self) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self._state, step_metrics = self._step(self._state, self._batch, self._batch_size,
                                               *self._base)
        jax.block_until_ready((self._state, step_metrics))
        self.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    def digest(self) -> tuple[int, float]:
        """(bytes, seconds) of the digests a checkpoint of the state takes when it is saved, and
        again when it is restored (`checkpoints.digests`)."""
        items = {"params": self._state.params, "opt_state": self._state.opt_state}
        start = time.perf_counter()
        checkpoints.digests(items, {})
        return (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(items)),
                time.perf_counter() - start)


class TorchStep:
    """The reference: `transformers.BloomForCausalLM` and `torch.optim.AdamW`, BLOOM's recipe
    (clip to norm 1, betas 0.9/0.95, weight decay 0.1), accumulating over the same micro-batches.

    Hugging Face's model takes no packed segments, so each row attends causally across its
    documents: the same FLOPs. bfloat16 configs run under CPU autocast (float32 master weights,
    as ours).
    """

    def __init__(self, workload: sharded_step.Workload, host_batch: dict[str, np.ndarray],
                 seed: int):
        # libgomp's threads spin after each parallel region by default, taking the cores from
        # XLA's step that runs next (torch's step ran 2-25x slower interleaved than alone);
        # waiting passively keeps the alternation fair. Read when torch loads libgomp.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch  # pylint: disable=g-import-not-at-top
            import transformers  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError(f"--compare_torch needs torch and transformers ({e}); install the "
                              "test extras: pip install -e '.[test]'.") from e
        self._torch = torch
        cfg = workload.model_config
        torch.manual_seed(seed)
        self._model = transformers.BloomForCausalLM(
            transformers.BloomConfig(**convert.hf_config_fields(cfg))).train()
        self._optimizer = torch.optim.AdamW(self._model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                            eps=1e-8, weight_decay=0.1, fused=True)
        self._autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                                        enabled=cfg.dtype.name == "bfloat16")
        self._micro_batches = [
            (torch.from_numpy(ids).long(), torch.from_numpy(targets).long(),
             torch.from_numpy(weights))
            for ids, targets, weights in zip(host_batch["input_ids"], host_batch["targets"],
                                             host_batch["loss_weights"])]

    def __call__(self) -> None:
        torch = self._torch
        total_weight = sum(weights.sum() for _, _, weights in self._micro_batches)
        for ids, targets, weights in self._micro_batches:
            with self._autocast:
                logits = self._model(input_ids=ids).logits  # [batch, length, vocab]
            losses = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            ((losses * weights.flatten()).sum() / total_weight).backward()
        torch.nn.utils.clip_grad_norm_(self._model.parameters(), 1.0)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)


def interleaved_medians(runners: dict[str, Any], steps: int, warmup_steps: int
                        ) -> dict[str, float]:
    """Median seconds per call of each runner, called in turn (so a machine's load falls on all
    of them alike) after `warmup_steps` untimed rounds."""
    times = {name: [] for name in runners}
    for index in range(warmup_steps + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if index >= warmup_steps:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark(steps: int = 10, warmup_steps: int = 2, seed: int = 0,
              compare_torch: bool = False, devices: Any = None) -> Result:
    """Benchmarks the parsed gin config: `steps` timed steps after `warmup_steps`, on a mesh
    over `devices` (None: every device).

    With `compare_torch`, timed steps alternate between ours and the reference's.
    Raises partitioning's MeshError when the mesh does not divide the model or batch.
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"need steps >= 1 and warmup_steps >= 0; got {steps}, {warmup_steps}.")
    workload = sharded_step.Workload()
    ours = JaxStep(workload, seed, devices)
    runners = {"ours": ours}
    if compare_torch:
        runners["torch"] = TorchStep(workload, ours.host_batch, seed)
    medians = interleaved_medians(runners, steps, warmup_steps)
    ours.digest()  # compiles the checksums
    digests = [ours.digest() for _ in range(3)]
    result = summarize(workload, ours.compile_s, ours.num_devices, medians, ours.peak_bytes)
    return dataclasses.replace(result, trained_param_bytes=ours.trained_bytes,
                               optimizer_state_bytes=ours.state_bytes,
                               host_page_faults_per_step=statistics.median(ours.page_faults),
                               checkpoint_bytes=digests[0][0],
                               digest_s=statistics.median(t for _, t in digests))


def summarize(workload: sharded_step.Workload, compile_s: float, num_devices: int,
              step_times: dict[str, float], step_peak_bytes: int) -> Result:
    """The figures from median step times ("ours", optionally "torch")."""
    cfg, step_time = workload.model_config, step_times["ours"]
    peak = flops.peak_flops(jax.devices()[0], cfg.dtype.name)
    model_flops = flops.flops_per_step(cfg, workload.batch_size, workload.sequence_length)
    figures = dict(
        compile_s=compile_s, step_time_s=step_time, tokens_per_s=workload.tokens / step_time,
        num_devices=num_devices, peak_flops=peak, model_flops_per_step=model_flops,
        step_peak_bytes=step_peak_bytes,
        tflops_per_device=flops.tflops_per_device(model_flops, step_time, num_devices),
        mfu=flops.mfu(model_flops, step_time, num_devices, peak))
    hardware_flops = flops.hardware_flops_per_step(cfg, workload.batch_size,
                                                   workload.sequence_length)
    figures.update(hardware_flops_per_step=hardware_flops,
                   hfu=flops.mfu(hardware_flops, step_time, num_devices, peak),
                   peak_host_rss_mb=metrics.peak_host_rss_mb(),
                   peak_device_bytes=metrics.peak_device_bytes())
    if "torch" in step_times:
        figures.update(torch_step_time_s=step_times["torch"],
                       torch_tokens_per_s=workload.tokens / step_times["torch"],
                       speedup_vs_torch=step_times["torch"] / step_time)
    return Result(**figures)


def format_result(result: Result, workload: sharded_step.Workload) -> str:
    """The human-readable report of one configuration."""
    cfg = workload.model_config
    lines = [
        f"model: {flops.param_count(cfg):,} parameters, {cfg.dtype.name} compute, remat "
        f"{cfg.remat_policy}, scan_layers {cfg.scan_layers}",
        f"batch: {workload.batch_size} sequences x {workload.sequence_length} tokens on "
        f"{result.num_devices} device(s) (peak {result.peak_flops / 1e12:.3g} TFLOP/s each"
        f"{', measured' if jax.devices()[0].platform == 'cpu' else ''})",
        f"compile: {result.compile_s:.1f} s",
        f"step: {result.step_time_s:.4f} s (median) | {result.tokens_per_s:,.0f} tokens/s",
        f"model FLOPs: {result.tflops_per_device:.3f} TFLOP/s/device | "
        f"MFU {100 * result.mfu:.1f}% | HFU {100 * result.hfu:.1f}% (remat "
        f"{cfg.remat_policy}'s recomputation counted)",
        f"optimizer state: {metrics.human(result.optimizer_state_bytes)}B, "
        f"{result.optimizer_state_bytes / result.trained_param_bytes:.2f} x the "
        f"{metrics.human(result.trained_param_bytes)}B of "
        f"{'LoRA adapters' if workload.lora else 'parameters'} trained",
        f"memory: peak host RSS {result.peak_host_rss_mb:,.0f} MiB"
        + ("" if result.host_page_faults_per_step is None
           else f" | {result.host_page_faults_per_step:,.0f} host page faults per step")
        + ("" if result.peak_device_bytes is None
           else f" | peak device {result.peak_device_bytes / 2**30:.2f} GiB"),
    ]
    if result.digest_s is not None:
        lines.append(f"checkpoint digests: {result.digest_s:.3f} s at each save and restore "
                     f"({result.checkpoint_bytes / 1e6:,.1f} MB of parameters and optimizer "
                     f"state, {result.checkpoint_bytes / 1e6 / result.digest_s:,.0f} MB/s; "
                     f"{result.digest_s / result.step_time_s:.2f} steps)")
    if result.speedup_vs_torch is not None:
        lines.append(f"torch (transformers BloomForCausalLM + AdamW): "
                     f"{result.torch_step_time_s:.4f} s | {result.torch_tokens_per_s:,.0f} "
                     f"tokens/s | ours is {result.speedup_vs_torch:.2f}x torch")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """The figures of cached greedy decoding: prefill and every new token, median of the runs."""

    batch: int
    prompt_length: int
    new_tokens: int
    compile_s: float
    time_s: float  # median, per whole generate call
    tokens_per_s: float  # new tokens of every row
    torch_time_s: float | None = None
    torch_tokens_per_s: float | None = None
    speedup_vs_torch: float | None = None
    same_tokens_as_torch: bool | None = None


def benchmark_generate(steps: int = 10, warmup_steps: int = 2, seed: int = 0,
                       compare_torch: bool = False, batch: int = 1, prompt_length: int = 32,
                       new_tokens: int = 64) -> GenerateResult:
    """Times `decoding.generate_ids` greedy on random prompts for the parsed config's model (and
    Hugging Face's `generate` on the same random weights, alternating, with `compare_torch`)."""
    config = sharded_step.Workload().model_config
    rng = np.random.default_rng(seed)
    prompts = rng.integers(SYNTHETIC_EOS_ID + 2, config.vocab_size, (batch, prompt_length))
    if compare_torch:
        torch, reference, params = _hf_model(config, seed)
    else:
        model = model_lib.BloomForCausalLM(config)
        params = jax.jit(model.init)(jax.random.key(seed), prompts[:, :1])["params"]
    params = decoding.generator(config).put_params(nn.unbox(params))
    ours = lambda: decoding.generate_ids(config, params, prompts, new_tokens, eos_token_id=None)
    start = time.perf_counter()
    out = ours()
    runners = {"ours": ours}
    figures = dict(batch=batch, prompt_length=prompt_length, new_tokens=new_tokens,
                   compile_s=time.perf_counter() - start)
    if compare_torch:
        def theirs():
            with torch.no_grad():
                return reference.generate(
                    torch.from_numpy(prompts).long(), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                    pad_token_id=decoding.PAD_ID).numpy()
        runners["torch"] = theirs
        figures["same_tokens_as_torch"] = bool(np.array_equal(out, theirs()))
    tokens = batch * new_tokens
    median = interleaved_medians(runners, steps, warmup_steps)
    figures.update(time_s=median["ours"], tokens_per_s=tokens / median["ours"])
    if compare_torch:
        figures.update(torch_time_s=median["torch"], torch_tokens_per_s=tokens / median["torch"],
                       speedup_vs_torch=median["torch"] / median["ours"])
    return GenerateResult(**figures)


def _hf_model(config: model_lib.BloomConfig, seed: int) -> tuple[Any, Any, Any]:
    """(torch, a random-weight `transformers.BloomForCausalLM` of `config`'s shape in eval
    mode, the same weights as our parameters)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see TorchStep
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    reference = transformers.BloomForCausalLM(
        transformers.BloomConfig(**convert.hf_config_fields(config))).eval()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        _, params = convert.load_hf_checkpoint(directory)
    return torch, reference, params


@dataclasses.dataclass(frozen=True)
class SweepRow:
    """One combination of a sweep: its bindings, and its figures or why it does not fit."""

    bindings: dict[str, str]
    result: Result | None = None
    does_not_fit: str | None = None


def parse_sweeps(sweeps: Sequence[str]) -> dict[str, list[str]]:
    """`["NAME=v1,v2", ...]` -> {NAME: [v1, v2]}."""
    parsed = {}
    for sweep in sweeps:
        name, sep, values = sweep.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"--sweep {sweep!r} is not NAME=v1,v2; e.g. "
                             "--sweep MICRO_BATCH_SIZE=1,2.")
        parsed[name.strip()] = [v.strip() for v in values.split(",")]
    return parsed


def does_not_fit(error: Exception) -> str | None:
    """Why a configuration does not fit, if `error` says so (mesh or memory); else None."""
    if isinstance(error, mesh_lib.MeshError):
        return f"mesh: {error}"
    message = str(error)
    if isinstance(error, jax.errors.JaxRuntimeError) and (
            "RESOURCE_EXHAUSTED" in message or "Out of memory" in message):
        return f"memory: {message.splitlines()[0]}"
    return None


def sweep(gin_files: Sequence[str], bindings: Sequence[str], sweeps: dict[str, list[str]],
          **benchmark_kwargs) -> list[SweepRow]:
    """Benchmarks every combination of the swept bindings (on top of the files and bindings),
    each from a fresh gin parse; fastest first, those that do not fit last."""
    rows = []
    for values in itertools.product(*sweeps.values()):
        combination = dict(zip(sweeps, values))
        gin.clear_config()
        configs.parse(gin_files, [*bindings, *(configs.binding(name, value)
                                               for name, value in combination.items())],
                      skip_unknown=configs.OUTSIDE_THE_STEP)
        try:
            rows.append(SweepRow(combination, result=benchmark(**benchmark_kwargs)))
        except Exception as e:  # pylint: disable=broad-except  # only those that do not fit
            reason = does_not_fit(e)
            if reason is None:
                raise
            rows.append(SweepRow(combination, does_not_fit=reason))
    return sort_rows(rows)


def sort_rows(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Fastest first; those that do not fit last, in their given order."""
    return sorted(rows, key=lambda r: -r.result.tokens_per_s if r.result else float("inf"))


def format_sweep(rows: Sequence[SweepRow]) -> str:
    """The sweep as a table, fastest first; a combination that does not fit says why."""
    names = list(rows[0].bindings)
    table = [[*names, "tokens/s", "step s", "MFU", "compile s", "vs torch"]]
    for row in rows:
        r = row.result
        cells = [row.bindings[name] for name in names]
        if r is None:
            table.append([*cells, f"does not fit ({row.does_not_fit})"])
            continue
        speedup = "" if r.speedup_vs_torch is None else f"{r.speedup_vs_torch:.2f}x"
        table.append([*cells, f"{r.tokens_per_s:,.0f}", f"{r.step_time_s:.4f}",
                      f"{100 * r.mfu:.1f}%", f"{r.compile_s:.1f}", speedup])
    # Column widths from the full rows; a reason runs on past the columns it spans.
    widths = [max(len(line[i]) for line in table if len(line) > i + 1)
              for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths + [0]))
                     .rstrip() for line in table)


# `--suite=gpu`: the sizes, at BLOOM's sequence length in bfloat16 on one device, each with both
# attentions. Dropout is off: attention dropout only runs on the einsum path (no fused kernel).
GPU_SUITE = {"bloom560m": "bloom560m.gin", "bloom1b7": "bloom1b7.gin"}
GPU_SUITE_BINDINGS = ("SEQUENCE_LENGTH = 2048", "BATCH_SIZE = 8", "BatchRampUp.start = 8",
                      "MICRO_BATCH_SIZE = None", "BloomConfig.dtype = 'bfloat16'",
                      "BloomConfig.attention_dropout = 0.0", "BloomConfig.hidden_dropout = 0.0")
GPU_SUITE_ATTENTION = ("cudnn", "xla")


def run_suite(models: dict[str, str], bindings: Sequence[str], implementations: Sequence[str],
              **benchmark_kwargs) -> dict[str, Any]:
    """Each model (name: gin file) with each attention implementation, on the first device:
    {model: {implementation: figures or {"error": why}, "<first>_speedup": ratio}}."""
    start, results = time.perf_counter(), {}
    for name, gin_file in models.items():
        results[name] = {}
        for implementation in implementations:
            gin.clear_config()
            configs.parse([gin_file], [*bindings, configs.binding(
                "BloomConfig.attention_implementation", implementation)],
                skip_unknown=configs.OUTSIDE_THE_STEP)
            try:
                result = benchmark(devices=jax.devices()[:1], **benchmark_kwargs)
                results[name][implementation] = _as_json(result)
            except (ValueError, NotImplementedError, RuntimeError) as e:  # cuDNN refusals, OOM
                results[name][implementation] = {"error": str(e).splitlines()[0]}
        first, second = (results[name][i].get("tokens_per_s") for i in implementations[:2])
        if first and second:
            results[name][f"{implementations[0]}_speedup"] = first / second
    return {"device": jax.devices()[0].device_kind, "bindings": list(bindings),
            "models": results, "peak_device_bytes": metrics.peak_device_bytes(),
            "wall_s": time.perf_counter() - start}


def gpu_suite(bindings: Sequence[str] = (), **benchmark_kwargs) -> dict[str, Any]:
    """`--suite=gpu` (`bindings` after the suite's own); raises a ValueError at once, before
    any work, without a GPU."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"--suite=gpu needs a GPU; jax sees {jax.devices()[0].platform} "
                         "devices only. Run it on a GPU machine with jax's CUDA wheels "
                         "(pip install 'jax[cuda12]').")
    return run_suite(GPU_SUITE, [*GPU_SUITE_BINDINGS, *bindings], GPU_SUITE_ATTENTION,
                     **benchmark_kwargs)


def _as_json(result: Result) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(result).items() if v is not None}


def main(argv: Sequence[str]) -> None:
    configs.no_arguments(argv)
    options = dict(steps=FLAGS.steps, warmup_steps=FLAGS.warmup_steps, seed=FLAGS.seed,
                   compare_torch=FLAGS.compare_torch)
    if FLAGS.generate:
        configs.parse_flags(skip_unknown=configs.OUTSIDE_THE_STEP)
        result = benchmark_generate(batch=FLAGS.generate_batch, prompt_length=FLAGS.prompt_length,
                                    new_tokens=FLAGS.new_tokens, **options)
        print(json.dumps({k: v for k, v in dataclasses.asdict(result).items() if v is not None})
              if FLAGS.json else "\n".join(f"{k}: {v}" for k, v in
                                           dataclasses.asdict(result).items() if v is not None))
        return
    if FLAGS.suite == "gpu":
        print(json.dumps(gpu_suite(FLAGS.gin_bindings, **options)))
        return
    if FLAGS.sweep:
        rows = sweep(FLAGS.gin_file, FLAGS.gin_bindings, parse_sweeps(FLAGS.sweep), **options)
        if FLAGS.json:
            print(json.dumps([{"bindings": row.bindings,
                               **({"does_not_fit": row.does_not_fit} if row.result is None
                                  else _as_json(row.result))} for row in rows]))
        else:
            print(format_sweep(rows))
        return
    configs.parse_flags(skip_unknown=configs.OUTSIDE_THE_STEP)
    result = benchmark(**options)
    print(json.dumps(_as_json(result)) if FLAGS.json
          else format_result(result, sharded_step.Workload()))


if __name__ == "__main__":
    define_flags()
    configs.run(main)
