"""The collectives of a compiled program, read from its HLO text: bytes per step, by link.

Every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute is counted once
per execution: its operand bytes on one device, times the trip counts of the while loops around
it (XLA's `known_trip_count`). Its wire bytes are what one device sends for it over a ring of n
devices: (n - 1) x the operand for an all-gather, (n - 1) / n x the operand for a reduce-scatter
or all-to-all, twice that for an all-reduce, the operand for a permute. Its replica groups say
which devices talk: logical device i is the i-th device of the mesh in row-major order, node
i // devices_per_node; a group inside one node runs over NVLink, one spanning nodes over the
network. The planner compiles on CPUs, so two things are read as a GPU would run them: an
all-reduce whose results are only sliced is the reduce-scatter XLA's GPU compiler makes of it,
and a float32 operand rounded from bfloat16 just before (the CPU compiler's float normalization
of a bfloat16 collective) counts 2 bytes an element.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
LINKS = ("nvlink", "network")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
               "c64": 8, "c128": 16}
# Bytes one device sends per operand byte, from the group size (and a permute's pairs).
_WIRE = {
    "all-gather": lambda n, groups: n - 1,
    "reduce-scatter": lambda n, groups: (n - 1) / n,
    "all-to-all": lambda n, groups: (n - 1) / n,
    "all-reduce": lambda n, groups: 2 * (n - 1) / n,
    "collective-permute": lambda n, pairs: float(any(s != t for s, t in pairs)),
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)="
                     r"(\{[^}]*\}|%[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program."""

    kind: str  # one of KINDS
    operand_bytes: int  # on one device, per execution
    wire_bytes: float  # sent by one device per execution
    group_size: int
    axes: tuple[str, ...]  # the mesh axes its groups span
    link: str  # "nvlink" (inside a node) or "network"
    count: int  # executions per run of the program (while-loop trip counts)
    name: str


def _shape_bytes(shape: str) -> int:
    return sum(_ITEM_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def _split_shape(rest: str) -> tuple[str, str]:
    """`SHAPE opcode(...)...` -> (SHAPE, `opcode(...)...`); a tuple shape is parenthesized."""
    if rest.startswith("("):
        depth = 0
        for i, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 2:]
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _operands(call: str) -> list[str]:
    """The `%name`s inside the opcode's top-level parentheses."""
    start, depth = call.index("("), 0
    for i in range(start, len(call)):
        depth += {"(": 1, ")": -1}.get(call[i], 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", call[start:i])
    return []


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    text: str  # the attributes after the operands
    computation: str


def _parse(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
    """Instructions per computation, and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    current, entry = None, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            current = header.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            shape, call = _split_shape(match.group(2))
            opcode = call.split("(", 1)[0]
            computations[current].append(_Instruction(
                match.group(1), shape, opcode, _operands(call) if "(" in call else [], call,
                current))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _executions(computations: dict[str, list[_Instruction]], entry: str,
                unknown_trips: int) -> dict[str, int]:
    """How many times each computation runs per run of the entry: callers' counts times the
    trip counts of the while loops whose body or condition it is (`unknown_trips` where XLA
    does not know it)."""
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for name, instructions in computations.items():
        for instruction in instructions:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.text)
            for attribute, target in _CALLED.findall(instruction.text):
                repeat = 1
                if attribute in ("body", "condition"):
                    repeat = int(trips.group(1)) if trips else unknown_trips
                for callee in re.findall(r"%([\w.\-]+)", target):
                    calls[name].append((callee, repeat))
    counts = collections.Counter({entry: 1})
    # HLO text lists callees before their callers: walk from the entry down.
    for name in reversed(list(computations)):
        for callee, repeat in calls.get(name, ()):
            counts[callee] += counts[name] * repeat
    return counts


def _groups(text: str, num_devices: int) -> list[list[int]]:
    """The replica groups (or permute pairs) of a collective, as lists of logical device ids."""
    if pairs := re.search(r"source_target_pairs=\{(.*?)\}\}", text):
        return [[int(s), int(t)] for s, t in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    if mesh := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))?"
                         r" \{([^}]*)\}", text):
        sizes = [int(s) for s in re.findall(r"=(\d+)", mesh.group(1))]
        names = re.findall(r"'([^']+)'=", mesh.group(1))
        ids = _iota(mesh.group(2), num_devices) if mesh.group(2) else np.arange(num_devices)
        grid = ids.reshape(sizes)
        varying = [names.index(axis) for axis in re.findall(r"'([^']+)'", mesh.group(3))]
        fixed = [i for i in range(len(sizes)) if i not in varying]
        grid = grid.transpose(fixed + varying)
        return grid.reshape(-1, math.prod(sizes[i] for i in varying)).tolist()
    if iota := re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", text):
        groups, size = int(iota.group(1)), int(iota.group(2))
        return _iota(iota.group(3), groups * size).reshape(groups, size).tolist()
    if explicit := re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)?\}", text):
        found = re.findall(r"\{([\d,]*)\}", explicit.group(1) or "")
        groups = [[int(d) for d in group.split(",") if d] for group in found]
        return [g for g in groups if g] or [list(range(num_devices))]
    raise ValueError(f"cannot read the replica groups of: {text[:200]}")


def _iota(spec: str, num_devices: int) -> np.ndarray:
    """Device ids of an iota list `[dims]T(perm)` (or `[dims]`), flattened."""
    dims = [int(d) for d in re.match(r"\[([\d,]+)\]", spec).group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if perm := re.search(r"T\(([\d,]+)\)", spec):
        ids = ids.transpose([int(p) for p in perm.group(1).split(",")])
    return ids.reshape(-1)


_PASSING = ("get-tuple-element", "bitcast", "convert", "copy")  # ops a sliced value may pass


def _only_sliced(name: str, users: dict[str, list[_Instruction]],
                 computations: dict[str, list[_Instruction]]) -> bool:
    """Whether every value read from `name` (through get-tuple-element, bitcasts, converts and
    copies, fused or not) is only dynamic-sliced."""
    found = users.get(name, [])
    for user in found:
        if user.opcode in _PASSING:
            if not _only_sliced(user.name, users, computations):
                return False
        elif user.opcode == "fusion":
            fused = computations[re.search(r"calls=%([\w.\-]+)", user.text).group(1)]
            if all(i.opcode in ("parameter", *_PASSING) for i in fused):
                if not _only_sliced(user.name, users, computations):
                    return False
                continue
            index = user.operands.index(name)
            inner = [i for i in fused if i.opcode == "parameter"
                     and re.match(rf"parameter\({index}\)", i.text)]
            if not inner or not _only_sliced(inner[0].name, _users(fused), computations):
                return False
        elif user.opcode != "dynamic-slice":
            return False
    return bool(found)


def _users(instructions: Iterable[_Instruction]) -> dict[str, list[_Instruction]]:
    users: dict[str, list[_Instruction]] = collections.defaultdict(list)
    for instruction in instructions:
        for operand in instruction.operands:
            users[operand].append(instruction)
    return users


def read(hlo: str, mesh_shape: dict[str, int], devices_per_node: int,
         unknown_trips: int = 1) -> list[Collective]:
    """The collectives of a compiled program (`compiled.as_text()`) on a mesh of `mesh_shape`
    (axis name -> size, in the mesh's order). A while loop whose trip count XLA does not know
    (a micro-step loop whose count is a traced value) runs `unknown_trips` times."""
    computations, entry = _parse(hlo)
    counts = _executions(computations, entry, unknown_trips)
    num_devices = math.prod(mesh_shape.values())
    found = []
    for name, instructions in computations.items():
        producers = {i.name: i for i in instructions}
        users = _users(instructions)
        for instruction in instructions:
            kind = instruction.opcode.removesuffix("-start")
            if kind not in KINDS or counts[name] == 0:
                continue
            groups = _groups(instruction.text, num_devices)
            axes, link = _spanned_axes(groups, mesh_shape), _link(groups, devices_per_node)
            for part, operand_bytes in _parts(kind, instruction, producers, users, computations):
                size = 2 if part == "collective-permute" else len(groups[0])
                wire = operand_bytes * _WIRE[part](size, groups)
                found.append(Collective(part, operand_bytes, wire, size, axes, link,
                                        counts[name], instruction.name))
    return found


def _operand_bytes(name: str, producers: dict[str, _Instruction],
                   computations: dict[str, list[_Instruction]]) -> int:
    """Bytes of a collective's operand; a float32 value rounded from bfloat16 just before (a
    convert to bf16 then to f32, fused or not, or of a bf16 value of as many elements: XLA's
    CPU float normalization of a bf16 collective) counts at bf16's 2 bytes an element, as a GPU
    moves it."""
    producer = producers.get(name)
    if producer is None:
        return 0
    size = _shape_bytes(producer.shape)
    inner = [producer]
    if producer.opcode == "fusion":
        inner = computations[re.search(r"calls=%([\w.\-]+)", producer.text).group(1)]
    converts = [i.shape.split("[")[0] for i in inner if i.opcode == "convert"]
    halves = [i.shape for i in inner if i.opcode == "parameter"] if producer.opcode == (
        "fusion") else [producers[o].shape for o in producer.operands if o in producers]
    rounded = converts[-1:] == ["f32"] and ("bf16" in converts or any(
        shape.startswith("bf16") and _shape_bytes(shape) * 2 == size for shape in halves))
    return size // 2 if rounded and producer.shape.startswith("f32") else size


def _parts(kind: str, instruction: _Instruction, producers: dict[str, _Instruction],
           users: dict[str, list[_Instruction]], computations: dict[str, list[_Instruction]],
           ) -> list[tuple[str, int]]:
    """(kind, operand bytes) of a collective; an all-reduce's operands whose results are only
    sliced form a reduce-scatter, the rest an all-reduce."""
    sizes = [_operand_bytes(o, producers, computations) for o in instruction.operands]
    if kind != "all-reduce":
        return [(kind, sum(sizes))]
    if instruction.shape.startswith("("):
        elements = collections.defaultdict(list)
        for user in users.get(instruction.name, []):
            index = re.search(r"index=(\d+)", user.text)
            elements[int(index.group(1)) if index else -1].append(user)
        sliced = [bool(elements.get(i)) and all(
            _only_sliced(u.name, users, computations) for u in elements[i])
            for i in range(len(sizes))]
    else:
        sliced = [_only_sliced(instruction.name, users, computations)] * len(sizes)
    parts = [("reduce-scatter", sum(b for b, s in zip(sizes, sliced) if s)),
             ("all-reduce", sum(b for b, s in zip(sizes, sliced) if not s))]
    return [(part, size) for part, size in parts if size]


def _spanned_axes(groups: list[list[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    coords = np.array(np.unravel_index(np.array(groups[0]), tuple(mesh_shape.values())))
    return tuple(axis for axis, row in zip(mesh_shape, coords) if len(set(row)) > 1)


def _link(groups: list[list[int]], devices_per_node: int) -> str:
    spans = any(len({d // devices_per_node for d in group}) > 1 for group in groups)
    return "network" if spans else "nvlink"


def wire_bytes_by(collectives: Iterable[Collective]) -> dict[str, float]:
    """Wire bytes per device per run, by link."""
    totals: dict[str, float] = collections.defaultdict(float)
    for c in collectives:
        totals[c.link] += c.wire_bytes * c.count
    return dict(totals)


def operand_bytes_by_kind(collectives: Iterable[Collective]) -> dict[str, int]:
    """Operand bytes per device per run of each kind, loop trip counts included."""
    totals: dict[str, int] = collections.Counter()
    for c in collectives:
        totals[c.kind] += c.operand_bytes * c.count
    return dict(totals)
