"""Read a kernel's SASS (``cuobjdump -sass``): instructions, loops, and what the inner loop issues.

A loop is a backward branch (``BRA`` to a lower address); the innermost loops are those that
contain no other loop, and the *main* loop is the longest of them (software pipelining leaves one
steady-state loop per source loop; prologue and epilogue copies are straight-line code). Counts
are static: instructions in the loop body's address range, each issued once per warp per
iteration (branches inside the body are counted as if both sides ran, an upper bound on the
straight-line path and the usual reading of a "per-iteration" SASS count).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.IGNORECASE)
_BRANCH_TARGET = re.compile(r"\b(?:BRA|BRX|JMP)(?:\.[A-Z0-9.]+)?\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)", re.IGNORECASE)
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")

# Instruction classes (by opcode, the mnemonic before its first '.'). Everything not listed is "other".
INTEGER = {
    "IMAD", "IADD3", "IADD", "IADD32I", "IMUL", "IMUL32I", "IMNMX", "IABS", "ISETP", "ISCADD", "IDP", "IMMA_",
    "LEA", "LOP", "LOP3", "LOP32I", "SHF", "SHL", "SHR", "SEL", "MOV", "MOV32I", "PRMT", "VIADD", "VIMNMX",
    "VIADDMNMX", "SGXT", "BMSK", "BREV", "FLO", "POPC", "P2R", "R2P", "PLOP3", "PSETP", "IMNMX", "CS2R", "S2R",
    "UIADD3", "UIMAD", "ULEA", "ULOP3", "ULOP", "USHF", "USEL", "UMOV", "UISETP", "UPRMT", "USGXT", "UPLOP3",
    "UFLO", "UPOPC", "UBMSK", "UBREV", "S2UR", "R2UR", "UR2R", "ULDC", "UIMNMX", "UVIADD", "LDC",
}
FLOAT = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "FADD32I", "FMUL32I", "FFMA32I",
         "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "HSET2", "FSET", "DADD", "DMUL", "DFMA"}
CONVERT = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND", "I2I", "I2IP"}
MMA = {"HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA", "UTCMMA", "UTCHMMA", "UTCQMMA"}
MUFU = {"MUFU"}
SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS"}
LOCAL = {"LDL", "STL"}
GLOBAL_STORE = {"STG", "RED", "ATOMG", "ATOM", "REDG", "UTMASTG"}
TMA_LOADS = {"UTMALDG", "UBLKCP"}
GLOBAL_LOAD = {"LDG", "LDGSTS"} | TMA_LOADS
CLASS_OF = {opcode: kind for kind, opcodes in (
    ("integer", INTEGER), ("fp32", FLOAT), ("convert", CONVERT), ("mma", MMA), ("mufu", MUFU),
    ("global_load", GLOBAL_LOAD), ("global_store", GLOBAL_STORE), ("shared", SHARED), ("local", LOCAL))
    for opcode in opcodes}


@dataclass
class Instruction:
    address: int
    text: str  # without predicate
    opcode: str  # full mnemonic, e.g. LDG.E.128
    base: str  # before the first '.', e.g. LDG
    target: int | None = None  # branch target


@dataclass
class Kernel:
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def parse(sass: str) -> list[Kernel]:
    """The kernels of a ``cuobjdump -sass`` listing, each a list of instructions."""
    kernels: list[Kernel] = []
    for line in sass.splitlines():
        fn = _FUNCTION.search(line)
        if fn:
            kernels.append(Kernel(fn.group(1)))
            continue
        m = _INSTRUCTION.match(line)
        if not m or not kernels:
            continue
        text = m.group(2).strip()
        if text.startswith("{"):  # dual-issue braces on old archs
            text = text.lstrip("{ ").strip()
        if text.startswith("@"):
            text = text.split(None, 1)[1] if " " in text else ""
        opcode = text.split(None, 1)[0] if text else ""
        branch = _BRANCH_TARGET.search(text) if opcode.split(".")[0] in ("BRA", "BRX", "JMP") else None
        kernels[-1].instructions.append(Instruction(int(m.group(1), 16), text, opcode, opcode.split(".")[0],
                                                    int(branch.group(1), 16) if branch else None))
    return kernels


def loops(kernel: Kernel) -> list[tuple[int, int]]:
    """``(first, last)`` addresses of each loop: a backward branch and its target (self-jumps excluded)."""
    return sorted({(i.target, i.address) for i in kernel.instructions
                   if i.target is not None and i.target < i.address})


def innermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def global_load_width(opcode: str) -> int | None:
    """Bits per thread of an LDG/LDGSTS (``LDG.E.128`` -> 128; plain ``LDG.E`` -> 32)."""
    parts = opcode.split(".")
    for p in parts[1:]:
        if p in ("64", "128", "256"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def classify(instructions: list[Instruction]) -> dict:
    """Counts by class, global loads by width and the opcode histogram."""
    classes: Counter = Counter()
    loads: Counter = Counter()
    async_copies: Counter = Counter()
    for ins in instructions:
        kind = CLASS_OF.get(ins.base, "other")
        classes[kind] += 1
        if ins.base == "LDG":
            loads[global_load_width(ins.opcode)] += 1
        elif ins.base == "LDGSTS":
            async_copies[global_load_width(ins.opcode)] += 1
        elif ins.base in TMA_LOADS:
            async_copies["tma"] += 1
    return dict(total=len(instructions), classes=dict(classes),
                ldg_by_bits={str(k): v for k, v in sorted(loads.items())},
                ldgsts_by_bits={str(k): v for k, v in sorted(async_copies.items(), key=lambda kv: str(kv[0]))},
                opcodes=dict(Counter(i.base for i in instructions).most_common()))


def analyse(sass: str, name: str | None = None) -> dict:
    """Static profile of one kernel of ``sass``: the main inner loop's instruction mix and the rest."""
    kernels = parse(sass)
    if not kernels:
        raise ValueError("no kernel in the SASS listing")
    kernel = next((k for k in kernels if name and k.name == name), kernels[0])
    code = [i for i in kernel.instructions if i.base != "NOP" or i is not kernel.instructions[-1]]
    # Trailing padding after the last EXIT (a self-branch and NOPs) is not code.
    while code and (code[-1].base == "NOP" or (code[-1].target is not None and code[-1].target == code[-1].address)):
        code.pop()
    spans = innermost(loops(kernel))
    per_loop = []
    for first, last in spans:
        body = [i for i in code if first <= i.address <= last]
        per_loop.append(dict(first=hex(first), last=hex(last), **classify(body)))
    per_loop.sort(key=lambda d: -d["total"])
    main = per_loop[0] if per_loop else None
    outside = len(code) - (main["total"] if main else 0)
    return dict(kernel=kernel.name, instructions=len(code), loops=per_loop, main_loop=main,
                outside_main_loop=outside, all_loops=[(hex(a), hex(b)) for a, b in loops(kernel)],
                whole=classify(code))
