"""HBM traffic of a compiled TPU program's loop body, read from its HLO text (``compiled.as_text()``).

    traffic = loop_hbm_traffic(compiled.as_text())
    traffic["bytes"]      # HBM bytes one iteration of the outermost while loop reads and writes, per device
    traffic["by_kind"]    # the same split by op kind (fusion, copy-start, all-reduce, ...)
    carried = carried_reads(compiled.as_text())   # per loop-carried HBM buffer: its bytes, the bytes read of it

XLA's "bytes accessed" counts every operand and result of every op at any memory level. The TPU compiler
assigns each buffer a memory space, printed in its layout: ``bf16[64,256]{1,0:T(8,128)(2,1)S(1)}`` lives in
memory space 1 (on-chip VMEM), a layout without ``S(n)`` in memory space 0 (HBM); ``S(2)`` and up are
semaphores and scalar memory. A weight streamed through VMEM is read from HBM once by its ``copy-start``
into ``S(1)``; the fusion that reads the VMEM copy adds no HBM traffic.

What is counted, per top-level instruction of the loop body (nested while loops' bodies once more):

* reads: the instruction's operands that live in HBM; for a fusion, a parameter its fused computation reads only
  through ``slice`` / ``dynamic-slice`` / ``gather`` counts the bytes it takes, and one it only updates in place (operand 0 of a
  ``dynamic-update-slice``) counts nothing; a nested fusion that only passes it on (a bitcast fusion feeding a
  matmul) hands it to that fusion's users;
* writes: the results that live in HBM; a result that is a ``dynamic-update-slice`` (an in-place update of an
  aliased buffer, e.g. the KV cache's one-token write) counts the update's bytes, not the buffer's;
* ``copy-start``: its HBM source (a read) and its destination when that is HBM (a write); ``slice-start``: the
  slice it takes of an HBM source (a read) and the slice when it lands in HBM (a write); ``*-done``,
  ``get-tuple-element``, ``tuple``, ``bitcast``, ``parameter``, ``constant``: nothing (no data moves, or it was
  counted at the start).

Bytes are logical (elements x element size), not the tiled and padded footprint, so they compare directly with
the read-once floor of the arrays' own sizes. The body's loop-carried values pass through without traffic; what
the loop does once per generation (before and after it) is not counted.
"""

from __future__ import annotations

import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
FREE = {"get-tuple-element", "tuple", "bitcast", "parameter", "constant", "partition-id", "replica-id",
        "after-all", "opt-barrier"}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*(?:\([^()]*\))*[^{}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")


class Array:
    """One array of a shape: element type, dimensions, memory space (0: HBM)."""

    __slots__ = ("dtype", "dims", "space")

    def __init__(self, dtype: str, dims: tuple, space: int):
        self.dtype, self.dims, self.space = dtype, dims, space

    @property
    def nbytes(self) -> float:
        n = 1
        for d in self.dims:
            n *= d
        return n * DTYPE_BYTES.get(self.dtype, 0)


def parse_shape(text: str) -> list[Array]:
    """The arrays of an HLO shape (a tuple's elements in order; tokens and empty tuples give none)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(re.sub(r"/\*.*?\*/", "", text)):
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


def hbm_bytes(arrays) -> float:
    return sum(a.nbytes for a in arrays if a.space == 0)


class Instr:
    __slots__ = ("name", "shape", "op", "operands", "args", "attrs", "root")

    def __init__(self, name, shape, op, operands, args, attrs, root):
        self.name, self.shape, self.op, self.operands = name, shape, op, operands
        self.args, self.attrs, self.root = args, attrs, root


def _matching(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_}{close} in {text[:200]!r}")


def _parse_instr(line: str) -> Instr | None:
    m = re.match(r"\s*(ROOT )?%([\w.\-]+) = ", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op, paren, rest = rest.partition("(")
    end = _matching("(" + rest, 0)
    args, attrs = rest[:end - 1], rest[end:]
    operands = re.findall(r"%([\w.\-]+)", args)
    return Instr(m.group(2), parse_shape(shape), op.strip(), operands, args, attrs, bool(m.group(1)))


def parse_module(text: str) -> tuple[dict, str]:
    """-> ({computation name: [Instr]}, entry computation name)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = comps.setdefault(h.group(2), [])
            entry = h.group(2) if h.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            ins = _parse_instr(line)
            if ins is not None:
                current.append(ins)
    return comps, entry


def _called(ins: Instr, key: str) -> str | None:
    m = re.search(key + r"=%([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None


def _users(comp: list[Instr]) -> dict:
    users = defaultdict(list)
    for i in comp:
        for k, o in enumerate(i.operands):
            users[o].append((i, k))
    return users


def _param_read(comps: dict, name: str, index: int, full: float) -> float:
    """Bytes fused computation ``name`` reads of its parameter ``index`` (``full`` bytes): the slices it takes
    when it only slices it (through bitcasts and nested fusions), 0 when it only updates it in place, else ``full``."""
    return _param_use(comps, name, index, full)[0]


def _param_use(comps: dict, name: str, index: int, full: float) -> tuple[float, bool]:
    """(bytes read, whether the parameter reaches the computation's result unchanged, through bitcasts). A nested
    fusion that passes it through (a bitcast fusion) hands the tracing on to that fusion's users."""
    comp = comps[name]
    users = _users(comp)
    param = next((i for i in comp if i.op == "parameter" and int(i.args.strip()) == index), None)
    if param is None:
        return 0.0, False
    root = next((i for i in comp if i.root), comp[-1])
    results = set(root.operands) if root.op == "tuple" else {root.name}
    todo, uses, through = [param.name], [], False
    while todo:
        n = todo.pop()
        through |= n in results
        for u, k in users[n]:
            if u.op == "bitcast":
                todo.append(u.name)
            elif u.op == "tuple" and u.root:
                pass
            else:
                uses.append((u, k))
    read = 0.0
    while uses:
        u, k = uses.pop()
        if u.op in ("slice", "dynamic-slice", "gather") and k == 0:
            read += sum(a.nbytes for a in u.shape)
        elif u.op == "dynamic-update-slice" and k == 0:
            pass  # updated in place: only the update is written (counted with the result)
        elif u.op == "fusion" and _called(u, "calls") in comps:
            sub, passes = _param_use(comps, _called(u, "calls"), k, full)
            read += sub
            if passes:  # the nested fusion's result is the parameter itself: its users read it
                uses.extend(users[u.name])
        else:
            return full, False
    return min(read, full), through


def _fusion_io(comps: dict, name: str, operand_arrays: list[list[Array]], out_arrays: list[Array]) -> tuple[float, float]:
    """(HBM bytes read, written) of one fusion calling ``name``: ``operand_arrays`` its operands, ``out_arrays`` its
    result."""
    comp = comps[name]
    by_name = {i.name: i for i in comp}
    read = sum(_param_read(comps, name, k, hbm_bytes(a)) for k, a in enumerate(operand_arrays) if hbm_bytes(a))
    root = next((i for i in comp if i.root), comp[-1])
    outs = [by_name.get(o) for o in root.operands] if root.op == "tuple" else [root]
    written = 0.0
    for k, a in enumerate(out_arrays):
        if a.space != 0:
            continue
        src = outs[k] if k < len(outs) else None
        while src is not None and src.op == "bitcast":
            src = by_name.get(src.operands[0])
        if src is not None and src.op == "dynamic-update-slice":
            upd = by_name.get(src.operands[1])
            written += sum(x.nbytes for x in upd.shape) if upd is not None else a.nbytes
        else:
            written += a.nbytes
    return read, written


def computation_hbm_traffic(comps: dict, name: str, seen=()) -> dict:
    """HBM bytes read and written by computation ``name``'s top-level instructions (see the module docstring)."""
    shapes: dict[str, list[Array]] = {}
    by_kind: dict[str, float] = defaultdict(float)
    total_read = total_written = 0.0
    for ins in comps[name]:
        shapes[ins.name] = ins.shape
        ops = [shapes.get(o, []) for o in ins.operands]
        op = ins.op
        if op in FREE or op.endswith("-done"):
            continue
        if op == "while":
            body = _called(ins, "body")
            if body and body not in seen:
                sub = computation_hbm_traffic(comps, body, seen + (name,))
                total_read, total_written = total_read + sub["read"], total_written + sub["written"]
                for k, v in sub["by_kind"].items():
                    by_kind[k] += v
            continue
        if op == "copy-start":
            r, w = hbm_bytes(ops[0]), hbm_bytes(ins.shape[:1])
        elif op in ("slice-start", "dynamic-slice-start"):  # result (source, slice, context): reads the slice only
            sliced = sum(a.nbytes for a in ins.shape[1:2])
            r, w = (sliced if ops and hbm_bytes(ops[0]) else 0.0), hbm_bytes(ins.shape[1:2])
        elif op.endswith("-start"):
            r, w = sum(hbm_bytes(a) for a in ops), 0.0  # the result is counted where it is read
        elif op == "fusion" and _called(ins, "calls") in comps:
            r, w = _fusion_io(comps, _called(ins, "calls"), ops, ins.shape)
        elif op == "dynamic-update-slice":
            update = sum(a.nbytes for a in ops[1]) if len(ops) > 1 else 0.0
            r, w = (hbm_bytes(ops[1]) if len(ops) > 1 else 0.0), (update if ins.shape and ins.shape[0].space == 0 else 0.0)
        elif op in ("dynamic-slice", "slice"):
            r = hbm_bytes(ins.shape) if ops and hbm_bytes(ops[0]) else 0.0
            w = hbm_bytes(ins.shape)
        else:
            r, w = sum(hbm_bytes(a) for a in ops), hbm_bytes(ins.shape)
        total_read += r
        total_written += w
        by_kind[op] += r + w
    return {"read": total_read, "written": total_written, "bytes": total_read + total_written,
            "by_kind": dict(by_kind)}


def loop_hbm_traffic(hlo_text: str) -> dict:
    """HBM traffic of one iteration of the entry computation's first while loop (the decode loop); see the module
    docstring. -> {"read", "written", "bytes", "by_kind"} in bytes per device."""
    comps, body = _loop_body(hlo_text)
    return computation_hbm_traffic(comps, body)


def _loop_body(hlo_text: str) -> tuple[dict, str]:
    """(computations, name of the body of the entry computation's first while loop)."""
    comps, entry = parse_module(hlo_text)
    loop = next((i for i in comps[entry] if i.op == "while"), None)
    if loop is None:
        raise ValueError("no while loop in the entry computation")
    return comps, _called(loop, "body")


def carried_reads(hlo_text: str, min_bytes: float = 2**20) -> list[dict]:
    """Per loop-carried HBM buffer of at least ``min_bytes`` of the decode loop's body (weights, caches): its bytes
    and the HBM bytes its users read of it by the rules above. A weight read once shows ``read == bytes``; a cache
    read a layer at a time, the sum of its layers; an embedding table, the rows gathered."""
    comps, name = _loop_body(hlo_text)
    body = comps[name]
    users = _users(body)
    out = []
    for g in body:
        if g.op != "get-tuple-element" or hbm_bytes(g.shape) < min_bytes:
            continue
        size, read, todo = hbm_bytes(g.shape), 0.0, [g.name]
        while todo:
            for u, k in users[todo.pop()]:
                if u.op in ("bitcast", "get-tuple-element") or (u.op == "dynamic-update-slice" and k == 0):
                    todo.append(u.name)  # the same buffer (updated in place)
                elif u.op == "fusion" and _called(u, "calls") in comps:
                    read += _param_read(comps, _called(u, "calls"), k, size)
                elif u.op in ("slice-start", "dynamic-slice-start"):
                    read += sum(a.nbytes for a in u.shape[1:2])
                elif u.op in ("tuple", "opt-barrier"):
                    pass
                elif u.op in ("dynamic-slice", "slice") and k == 0:
                    read += sum(a.nbytes for a in u.shape)
                else:
                    read += size
        out.append({"name": g.name, "dtype": g.shape[0].dtype, "dims": list(g.shape[0].dims), "bytes": size,
                    "read": read})
    return out
