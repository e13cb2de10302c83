"""Static GPU report: registers, occupancy, SASS per element and a bandwidth model, no GPU.

Every signature of every ``ptx_signatures()`` in ``fastloss/cuda/`` is compiled
to PTX (numba-cuda's ``compile_ptx``), assembled for sm_90 with ``ptxas -v``
(registers, spills, shared memory, and the cubin) and disassembled with
``nvdisasm`` (``fastloss/cuda/_ptxas.py``; the ``cuda`` extra).  From the SASS
it finds the loops (natural loops of the control-flow graph: a branch back to
a block that dominates it), picks each kernel's element loops by the rule
stated in the report, and counts their instructions per element.  For the
key cases (``CASES``: CE and focal rows at 4096x131072, the elementwise
kernels at 2**26 elements) it models the kernel's time on an H200 from those
counts and the machine's stated figures, as a fraction of a copy of the same
bytes.  Nothing here is measured: ``bench/gpu_check.sh`` measures on a GPU.

    python bench/gpu_static.py                  # writes bench/results/gpu-static.md
    python bench/gpu_static.py --kernels cross_entropy_kernel --out /tmp/ce.md
"""
import argparse
import importlib
import inspect
import math
import pkgutil
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------- sm_90 limits per SM
# (CUDA C Programming Guide, compute capability 9.0: H100 and H200 alike)
SM_REGISTERS = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
SM_WARPS = 64  # 2,048 threads
SM_BLOCKS = 32
SM_SHARED = 228 * 1024  # bytes, the largest carve-out (a block may use 227 KB of it)
SHARED_UNIT = 128  # shared memory is allocated per block in units of 128 bytes
WARP = 32

# ---------------------------------------------------------------- the machine model: H200 SXM
SMS = 132
CLOCK = 1.98e9  # Hz, boost
SCHEDULERS = 4  # warp schedulers per SM, each issuing one warp instruction per cycle
HBM = 4.8e12  # bytes per second, HBM3e
L2 = 50e6  # bytes
HBM_LATENCY = 700e-9  # seconds, a load from HBM under load
L2_LATENCY = 300e-9  # seconds, an L2 hit: an assumption, about 600 cycles (the far partition)

# ---------------------------------------------------------------- per-kernel facts
#: The arguments a kernel loads once per element in its element loops: an
#: iteration handles (bytes its global loads read) / (the itemsizes of those of
#: them present in the signature) elements.  A kernel not here gets per
#: iteration figures only.  Kernels that load nothing per element (fill) name
#: what they store instead, in STORES_PER_ELEMENT.
LOADS_PER_ELEMENT = {
    "cross_entropy_kernel": ("x", "probs", "weight"),
    "focal_kernel": ("x", "probs", "alpha"),
    "sigmoid_focal_kernel": ("x", "t"),
    "huber_elements_kernel": ("x", "t", "sw"),
    "weight_partials_kernel": ("w",),
    "_total_kernel": ("losses",),
    "_class_denominator_kernel": ("labels", "weight", "sw"),
    "_first_bad_label_kernel": ("labels",),
    "copy_rows_kernel": ("src",),
    "copy_flat_kernel": ("src",),
    "_copy_kernel": ("src",),
    "_column_sums_kernel": ("x",),
    "count_labels_kernel": ("labels",),
    "triplet_rows_kernel": ("xa", "xp", "xn"),
    "center_rows_kernel": ("x", "centers"),
}
STORES_PER_ELEMENT = {"fill_kernel": ("out",)}


@dataclass
class Case:
    """One modelled call: a kernel at a size, the signature of that call (types
    by parameter name: update when a kernel's parameters change), and the
    compulsory traffic per element in bytes."""
    name: str
    module: str
    kernel: str
    dtype: str  # "float32" or "float16"
    shape: tuple  # (rows, columns) for row kernels, (n,) for elementwise ones
    args: dict  # parameter name -> Numba type (None: absent)
    read: int  # compulsory bytes read per element (the gradient kernel: the input(s))
    written: int  # compulsory bytes written per element (the gradient)
    pass2_order: str = "forward"  # row kernels: how a later pass walks the row (forward / reverse)
    fast_row_passes: bool = False  # the fast row loops' passes (``row_passes``)
    second_stage: tuple = ()  # (module, kernel, args) summing the per-block partials


def _cases():
    from numba import types
    i64, f64 = types.int64, types.float64
    cases = []
    for name, X in (("float32", types.float32), ("float16", types.float16)):
        T = types.float32
        b = X.bitwidth // 8
        rows = dict(x=X[:, ::1], labels=i64[::1], probs=None, stats=f64[::1], g=X[:, ::1],
                    losses=T[::1], sw=None, ignore_index=i64)
        cases.append(Case(f"CE {name}", "cross_entropy", "cross_entropy_kernel", name,
                          (4096, 131072),
                          dict(rows, weight=None, eps=T, smooth_sums=None, zcoef=T, cap=None,
                               total=X[::1]), b, b, pass2_order="reverse", fast_row_passes=True))
        cases.append(Case(f"focal {name}", "focal", "focal_kernel", name, (4096, 131072),
                          dict(rows, alpha=None, ascale=T, gamma=T, total=X[::1]), b, b,
                          pass2_order="reverse", fast_row_passes=True))
    total = ("_reduction", "_total_kernel", dict(losses=f64[::1], stats=f64, out=f64[::1]))
    for name, X in (("float32", types.float32), ("float16", types.float16)):
        T = types.float32
        b = X.bitwidth // 8
        flat = dict(x=X[::1], t=X[::1], n=i64, stats=f64, g=X[::1], losses=None,
                    partials=f64[::1])
        cases.append(Case(f"Huber {name}", "huber", "huber_elements_kernel", name, (2 ** 26,),
                          dict(flat, sw=None, inner=i64, period=i64, delta=T), 2 * b, b,
                          second_stage=total))
        cases.append(Case(f"sigmoid focal {name}", "focal", "sigmoid_focal_kernel", name,
                          (2 ** 26,), dict(flat, alpha=T, gamma=T, squared=types.boolean), 2 * b, b,
                          second_stage=total))
    return cases


# ---------------------------------------------------------------- occupancy


def occupancy(registers, threads, shared=0):
    """``(blocks, limit)``: blocks of ``threads`` threads resident on one sm_90 SM
    with ``registers`` per thread and ``shared`` bytes of static shared memory,
    and what limits them (registers, shared, warps, blocks)."""
    warps = -(-threads // WARP)
    per_warp = -(-registers * WARP // REGISTER_UNIT) * REGISTER_UNIT
    per_block = -(-shared // SHARED_UNIT) * SHARED_UNIT
    limits = {"registers": SM_REGISTERS // (per_warp * warps) if registers else SM_BLOCKS,
              "shared": SM_SHARED // per_block if shared else SM_BLOCKS,
              "warps": SM_WARPS // warps, "blocks": SM_BLOCKS}
    limit = min(limits, key=lambda k: (limits[k], k != "blocks"))
    return limits[limit], limit


# ---------------------------------------------------------------- SASS


@dataclass
class Instr:
    addr: int
    pred: str  # "" when unpredicated
    op: str  # opcode with its modifiers, "LDG.E.64"
    operands: str
    target: str = None  # the label a branch or call goes to

    @property
    def base(self):
        return self.op.split(".")[0]


_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;\s*$")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"\bR(\d+)\b")
_END = {"EXIT", "RET", "BRX", "JMX", "KILL", "BPT"}  # no fall-through (unless predicated)


def parse_sass(text):
    """``(instructions, labels)`` of the first function in ``nvdisasm -c``'s text
    (the kernel; internal subroutines follow it and are never entered by a branch)."""
    instrs, labels = [], {}
    pending = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            body = m.group(2)
            pred = ""
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            op, _, operands = body.partition(" ")
            t = _TARGET.search(operands)
            instr = Instr(int(m.group(1), 16), pred, op, operands, t.group(1) if t else None)
            for name in pending:
                labels[name] = instr.addr
            pending = []
            instrs.append(instr)
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
    return instrs, labels


def _unconditional(instr):
    return instr.pred in ("", "@PT")


def basic_blocks(instrs, labels):
    """``(blocks, succ)``: blocks as lists of instruction indices, and each block's
    successors.  Calls return (fall through); a predicated exit falls through."""
    at = {ins.addr: i for i, ins in enumerate(instrs)}
    starts = {0}
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "JMP") or ins.base in _END:
            starts.add(i + 1)
            if ins.base in ("BRA", "JMP") and ins.target in labels:
                starts.add(at[labels[ins.target]])
    starts = sorted(s for s in starts if s < len(instrs))
    block_of = {}
    blocks = []
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(instrs)
        blocks.append(list(range(s, end)))
        block_of[s] = k
    succ = []
    for k, b in enumerate(blocks):
        last = instrs[b[-1]]
        out = []
        if last.base in ("BRA", "JMP") and last.target in labels:
            out.append(block_of[at[labels[last.target]]])
        falls = not ((last.base in ("BRA", "JMP") or last.base in _END) and _unconditional(last))
        if falls and k + 1 < len(blocks):
            out.append(k + 1)
        succ.append(out)
    return blocks, succ


def dominators(succ, entry=0):
    """Dominator sets of the blocks reachable from ``entry`` (iterative data flow)."""
    reach, stack = {entry}, [entry]
    while stack:
        for s in succ[stack.pop()]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    pred = defaultdict(set)
    for b in reach:
        for s in succ[b]:
            pred[s].add(b)
    dom = {b: set(reach) for b in reach}
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in sorted(reach):
            if b == entry:
                continue
            new = set.intersection(*(dom[p] for p in pred[b])) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom, pred


@dataclass(eq=False)
class Loop:
    header: int  # block index
    blocks: set
    instrs: list = field(default_factory=list)  # Instr, in address order from the header
    inner: bool = True  # holds no other loop

    @property
    def first(self):
        return self.instrs[0].addr

    def count(self, *bases):
        return sum(1 for i in self.instrs if i.base in bases)

    def bytes_of(self, *bases):
        return sum(access_bytes(i) for i in self.instrs if i.base in bases)


def access_bytes(instr):
    """Bytes one thread moves with a load or store (the width modifier; 32 bits by default)."""
    mods = instr.op.split(".")[1:]
    for m, n in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return n
    return 4


def loops(instrs, labels):
    """The natural loops of the kernel (one per header, back edges merged)."""
    blocks, succ = basic_blocks(instrs, labels)
    dom, pred = dominators(succ)
    bodies = defaultdict(set)
    for b in dom:
        for h in succ[b]:
            if h in dom and h in dom[b]:  # b -> h with h dominating b: a back edge
                body, stack = {h, b}, [b]
                while stack:
                    n = stack.pop()
                    if n == h:
                        continue
                    for p in pred[n]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                bodies[h] |= body
    found = []
    for h, body in bodies.items():
        head = instrs[blocks[h][0]].addr
        ordered = sorted(body, key=lambda k: (instrs[blocks[k][0]].addr < head,
                                              instrs[blocks[k][0]].addr))
        found.append(Loop(h, body, [instrs[i] for k in ordered for i in blocks[k]]))
    for loop in found:
        loop.inner = not any(o is not loop and o.header in loop.blocks for o in found)
    reachable = sum(len(blocks[b]) for b in dom)
    return sorted(found, key=lambda lp: lp.first), reachable, succ


def heaviest_chain(group, found, succ, weight, pick=max):
    """The loops of ``group`` that run one after another for one piece of work
    (one iteration of the loop enclosing them, a row), with the largest total
    ``weight``: loop B follows loop A when B's header is reachable from A's exits
    without passing the enclosing loop's header; loops that do not follow each
    other are alternatives (paths for different cases), of which one runs."""
    def enclosing_header(lp):
        outer = [o for o in found if o is not lp and lp.header in o.blocks]
        return min(outer, key=lambda o: len(o.blocks)).header if outer else None

    def follows(a, b):
        stop = enclosing_header(a)
        stack = [s for blk in a.blocks for s in succ[blk] if s not in a.blocks]
        seen = set()
        while stack:
            n = stack.pop()
            if n in seen or n == stop:
                continue
            if n == b.header:
                return True
            seen.add(n)
            stack.extend(succ[n])
        return False

    best = {}
    after = {id(a): [b for b in group if b is not a and follows(a, b)] for a in group}

    def chain(a):
        if id(a) not in best:
            best[id(a)] = [a]  # a guard against cycles
            rest = pick((chain(b) for b in after[id(a)]), key=lambda c: sum(map(weight, c)),
                        default=[])
            best[id(a)] = [a] + rest
        return best[id(a)]
    first = [a for a in group if not any(a in after[id(b)] for b in group)] or group
    return pick((chain(a) for a in first), key=lambda c: sum(map(weight, c)), default=[])


def _registers(text, width=1):
    regs = set()
    for r in _REG.findall(text):
        regs.update(range(int(r), int(r) + width))
    return regs


def loads_before_use(loop):
    """Global loads a thread issues in one pass over the loop body (address order
    from its header) before an instruction reads what one of them loaded: the loads
    it has in flight at once, under in-order issue."""
    loaded, n = set(), 0
    for ins in loop.instrs:
        if ins.base in ("LDG", "LD"):
            dest, _, address = ins.operands.partition(",")
            if _registers(address) & loaded:
                break
            loaded |= _registers(dest, max(1, access_bytes(ins) // 4))
            n += 1
            continue
        sources = ins.operands if ins.base in ("STG", "ST", "STS", "RED", "ATOMG") else \
            ins.operands.partition(",")[2]
        if _registers(sources) & loaded:
            break
    return n


# ---------------------------------------------------------------- one signature


@dataclass
class Analysis:
    usage: object  # _ptxas.Usage, with the kernel's register bound
    loops: list  # the inner loops that load (or, for a store-only kernel, store) per element
    chosen: list  # the element loops: the main loop of each pass
    elements: dict  # id(loop) -> elements per iteration (None: not defined for this kernel)
    reachable: int  # instructions reachable from the entry, each once
    rule: str  # how the loops were chosen, in words
    tails: list  # the heaviest chain of tail loops (they run when a main loop cannot)
    lightest: list  # the sequence of candidates with the fewest instructions per element


def element_bytes(kernel, sig, names):
    """Bytes per element of the arguments ``names`` of ``kernel`` present in ``sig``."""
    params = list(inspect.signature(kernel.py_func).parameters)
    total = 0
    for name in names:
        if name in params:
            t = sig[params.index(name)]
            if hasattr(t, "dtype") and hasattr(t, "ndim"):
                total += getattr(t.dtype, "bitwidth", 8) // 8  # a boolean is a byte
    return total


def analyse(kernel, sig, usage, text):
    name = kernel.py_func.__name__
    instrs, labels = parse_sass(text)
    found, reachable, succ = loops(instrs, labels)
    stores = name in STORES_PER_ELEMENT
    kinds = ("STG", "ST") if stores else ("LDG", "LD")
    per = element_bytes(kernel, sig, (STORES_PER_ELEMENT if stores else LOADS_PER_ELEMENT)
                        .get(name, ()))
    cands = [lp for lp in found if lp.inner and lp.count(*kinds)]
    elements = {id(lp): lp.bytes_of(*kinds) / per if per else None for lp in cands}

    def size(lp):  # elements per iteration, else global accesses per iteration
        return elements[id(lp)] if per else lp.count(*kinds)
    unit = "elements" if per else "global accesses"
    if cands and max(size(lp) for lp in cands) > 1:
        unrolled = [lp for lp in cands if size(lp) > 1]
        tails = [lp for lp in cands if size(lp) <= 1]
        rule = (f"inner loops with global {'stores' if stores else 'loads'}; those handling more "
                f"than one of their {unit} per iteration (unrolled), the others being the tails "
                "after them")
    else:
        unrolled, tails = cands, []
        rule = f"inner loops with global {'stores' if stores else 'loads'}, all of them"

    def weight(lp):
        return len(lp.instrs) / (size(lp) or 1)
    chosen = heaviest_chain(unrolled, found, succ, weight)
    tail_chain = heaviest_chain(tails, found, succ, weight)
    lightest = heaviest_chain(unrolled, found, succ, weight, min)
    return Analysis(usage, cands, chosen, elements, reachable, rule, tail_chain, lightest)


def per_element(a):
    """SASS instructions per element of the chosen loops, summed over them (each a pass
    over the elements); None when an element is not defined for the kernel."""
    if not a.chosen or any(a.elements[id(lp)] is None for lp in a.chosen):
        return None
    return sum(len(lp.instrs) / a.elements[id(lp)] for lp in a.chosen)


# ---------------------------------------------------------------- compile everything


def kernel_cases(only=None):
    import fastloss.cuda
    cases = []
    for info in sorted(pkgutil.iter_modules(fastloss.cuda.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"fastloss.cuda.{info.name}")
        for kernel, sig in getattr(module, "ptx_signatures", lambda: [])():
            if only is None or kernel.py_func.__name__ in only:
                cases.append((info.name, kernel, tuple(sig)))
    return cases


def case_signature(case):
    """The case's kernel and argument types, in the order of its parameters."""
    module = importlib.import_module(f"fastloss.cuda.{case.module}")
    kernel = getattr(module, case.kernel)
    params = list(inspect.signature(kernel.py_func).parameters)
    if set(params) != set(case.args):
        raise SystemExit(f"CASES[{case.name!r}] names {sorted(case.args)}, but "
                         f"{case.kernel} takes {params}: update _cases() in bench/gpu_static.py")
    from numba import types
    return kernel, tuple(types.none if case.args[p] is None else case.args[p] for p in params)


def compile_all(jobs, only=None):
    """``(signatures, cases)``: every ``ptx_signatures()`` entry as ``(module, kernel,
    sig, Analysis)``, and each ``Case`` with ``(kernel, sig, Analysis)`` of its kernel and
    of its second stage (or None)."""
    from fastloss.cuda import _ptxas
    ptxas, nvdisasm = _ptxas.find_ptxas(), _ptxas.find_nvdisasm()
    if ptxas is None or nvdisasm is None:
        raise SystemExit("ptxas or nvdisasm not found: pip install 'fastloss[cuda]' "
                         "(nvidia-cuda-nvcc, nvidia-cuda-nvdisasm)")
    sigs = kernel_cases(only)
    cases = [c for c in _cases() if only is None or c.kernel in only]
    work = [(k, s) for _, k, s in sigs]
    for c in cases:
        work.append(case_signature(c))
        if c.second_stage:
            module, name, args = c.second_stage
            work.append(case_signature(Case(c.name, module, name, c.dtype, (), args, 0, 0)))
    unique = list(dict.fromkeys(work))
    ptx = {}
    for i, (kernel, sig) in enumerate(unique):
        ptx[kernel, sig] = _ptxas.compile_ptx(kernel, sig)
        if (i + 1) % 25 == 0 or i + 1 == len(unique):
            print(f"compiled {i + 1}/{len(unique)} signatures", file=sys.stderr, flush=True)

    def one(key):
        kernel, sig = key
        usage, cubin = _ptxas.assemble(ptx[key], kernel.targetoptions.get("max_registers"), ptxas)
        return analyse(kernel, sig, usage, _ptxas.sass(cubin, nvdisasm))
    with ThreadPoolExecutor(jobs) as pool:
        done = dict(zip(unique, pool.map(one, unique)))
    out_sigs = [(m, k, s, done[k, s]) for m, k, s in sigs]
    out_cases = []
    i = len(sigs)
    for c in cases:
        main = work[i] + (done[work[i]],)
        i += 1
        second = None
        if c.second_stage:
            second = work[i] + (done[work[i]],)
            i += 1
        out_cases.append((c, main, second))
    return out_sigs, out_cases


# ---------------------------------------------------------------- the model


def row_launch(kernel, rows, width):
    """``(threads, blocks)`` the row launcher uses (``_blocks.fit``, ``threads_for``,
    ``row_grid``) on a GPU of ``SMS`` SMs."""
    from fastloss.cuda import _blocks
    saved = _blocks.sm_count
    _blocks.sm_count = lambda: SMS
    try:
        threads = _blocks.fit(kernel, _blocks.threads_for(width))
        return threads, _blocks.row_grid(rows, threads)
    finally:
        _blocks.sm_count = saved


def flat_launch(kernel, n):
    """``(threads, blocks)`` of a grid-stride launch over ``n`` elements
    (``_reduction.elementwise_grid``)."""
    from fastloss.cuda import _blocks, _reduction
    blocks, threads = _reduction.elementwise_grid(n)
    return _blocks.fit(kernel, threads), blocks


def issue_time(warp_instructions, sms):
    return warp_instructions / (sms * SCHEDULERS * CLOCK)


def evict_first(chain):
    """Whether the loops of ``chain`` store, and only evict-first (``st.global.cs``,
    SASS ``STG.E.EF``): L2 evicts those lines before the others, so a gradient
    written once does not push out the rows that a later pass re-reads."""
    stores = [i for lp in chain for i in lp.instrs if i.base in ("STG", "ST")]
    return bool(stores) and all("EF" in i.op.split(".") for i in stores)


def row_passes(chain, elements):
    """The passes of ``cuda/_rows``'s fast row loops in a chain of loops: the loops before
    the last one that stores are segments of pass 1 (the steps before and after the
    target's: each element goes through one of them, so the heaviest counts), the storing
    loop is pass 2, and a loop after it (the last block's total over the per-row losses,
    once per call) is no element loop."""
    stores = [k for k, lp in enumerate(chain) if lp.count("STG", "ST")]
    if not stores:
        return chain
    last = stores[-1]
    first = chain[:last]
    heaviest = [max(first, key=lambda lp: len(lp.instrs) / elements[id(lp)])] if first else []
    return heaviest + [chain[last]]


def model(case, main, second):
    """The modelled time of ``case`` and its parts, as a dict (seconds, bytes)."""
    kernel, sig, a = main
    b = 2 if case.dtype == "float16" else 4
    r = {"case": case, "analysis": a, "notes": []}
    if len(case.shape) == 2:
        rows, width = case.shape
        threads, blocks = row_launch(kernel, rows, width)
        n = rows * width
    else:
        (n,), rows = case.shape, None
        threads, blocks = flat_launch(kernel, n)
    fits, limit = occupancy(a.usage.registers, threads, a.usage.shared)
    wanted = -(-blocks // SMS)
    resident = min(fits, wanted)
    sms = min(SMS, blocks)
    r.update(threads=threads, blocks=blocks, fits=fits, limit=limit, resident=resident,
             resident_threads=resident * threads, n=n)
    if case.fast_row_passes:
        a.chosen = row_passes(a.chosen, a.elements)
    running = a.chosen  # the element loops that run: the main loops, or the tails
    tails = a.tails
    per_thread_elements = (case.shape[1] / threads if rows is not None
                           else n / (blocks * threads))
    if tails and per_thread_elements < min(a.elements[id(lp)] for lp in a.chosen):
        running = tails
        r["notes"].append(f"{case.name}: a thread has {per_thread_elements:g} element(s) "
                          "per pass, fewer than one main-loop iteration takes: the tail loops "
                          "run, and the main loops are left out of the whole kernel's count")
    # the rest of the kernel, each instruction once, with the tails when the main loops
    # run, without the alternatives to the loops that run
    counted = set() if running is tails else set(tails)
    rest = a.reachable - sum(len(lp.instrs) for lp in a.loops if lp not in counted)
    loop_instrs = sum(len(lp.instrs) / a.elements[id(lp)] for lp in running)
    if rows is not None:
        # per row: each thread handles width / threads elements per pass, plus the rest of
        # the kernel once (block reductions, tails, prologue)
        warp_instr = rows * (threads / WARP) * (rest + loop_instrs * per_thread_elements)
        in_flight_rows = min(rows, resident * SMS)
        row_bytes = width * b
        streamed = evict_first(running)
        working = in_flight_rows * row_bytes * (2 if case.written and not streamed else 1)
        passes = len(running)
        if working <= L2:
            hit = 1.0
        elif case.pass2_order == "reverse":
            hit = L2 / working
        else:
            hit = 0.0
        r.update(in_flight_rows=in_flight_rows, working=working, passes=passes, hit=hit,
                 streamed=streamed)
    else:
        warp_instr = blocks * (threads / WARP) * (rest + loop_instrs * per_thread_elements)
        passes, hit = 1, 0.0
    r.update(per_thread_elements=per_thread_elements, loop_instrs=per_element(a), rest=rest,
             whole=(rest + loop_instrs * per_thread_elements) / per_thread_elements)
    compulsory = n * (case.read + case.written)
    # each chosen loop reads its loads' bytes per element; the first pass from HBM, the
    # later ones from L2 for the fraction `hit`
    latency = 0.0
    reread = 0.0
    r["in_flight"] = []  # per running loop: (loads in flight per thread, bytes per load)
    for k, lp in enumerate(running):
        per_elem = lp.bytes_of("LDG", "LD") / a.elements[id(lp)]
        loads = max(1, loads_before_use(lp))
        load_bytes = lp.bytes_of("LDG", "LD") / lp.count("LDG", "LD")
        r["in_flight"].append((loads, load_bytes))
        flight = resident * threads * SMS * loads * load_bytes
        from_l2 = 0.0 if k == 0 else hit
        latency += n * per_elem * ((1 - from_l2) * HBM_LATENCY + from_l2 * L2_LATENCY) / flight
        if k:
            reread += n * per_elem * (1 - hit)
    t_issue = issue_time(warp_instr, sms)
    t_hbm = (compulsory + reread) / HBM
    t = {"issue": t_issue, "HBM": t_hbm, "latency": latency}
    bound = max(t, key=t.get)
    r.update(compulsory=compulsory, reread=reread, times=t, bound=bound, kernel_time=t[bound])
    total = t[bound]
    if second is not None:
        r["second"] = s = second_stage(second, blocks)
        total += s["time"]
    r["total"] = total
    r["copy"] = compulsory / HBM
    r["fraction"] = r["copy"] / total
    return r


def second_stage(stage, partials):
    """One block summing ``partials`` float64 per-block sums (just written: in L2)."""
    from fastloss.cuda import _blocks
    kernel, _, a = stage
    threads = _blocks.fit(kernel, _blocks.THREADS)
    per_thread = partials / threads
    per_elem = per_element(a)
    lp = a.chosen[0] if a.chosen else None
    lbu = max(1, loads_before_use(lp)) if lp else 1
    rest = a.reachable - sum(len(x.instrs) for x in a.chosen)
    t_issue = issue_time((threads / WARP) * (rest + (per_elem or 0) * per_thread), 1)
    load = lp.bytes_of("LDG", "LD") / lp.count("LDG", "LD") if lp else 8
    t_lat = partials * 8 * L2_LATENCY / (threads * lbu * load)
    return {"kernel": kernel.py_func.__name__, "threads": threads, "partials": partials,
            "loads_in_flight": lbu, "issue": t_issue, "latency": t_lat,
            "time": max(t_issue, t_lat), "per_elem": per_elem}


# ---------------------------------------------------------------- the report

NEEDED_IN_FLIGHT = HBM / SMS * HBM_LATENCY  # bytes per SM that cover HBM's latency (Little's law)


def _us(t):
    return f"{t * 1e6:,.0f} us" if t >= 1e-5 else f"{t * 1e6:.1f} us"


def _mb(x):
    return f"{x / 1e6:,.0f} MB" if x >= 10e6 else f"{x / 1e6:.2f} MB"


def _short(t):
    from numba import types
    if isinstance(t, types.Array):
        dims = ", ".join([":"] * (t.ndim - 1) + ["::1" if t.layout == "C" else ":"])
        return f"{t.dtype}[{dims}]"
    return "None" if isinstance(t, types.NoneType) else str(t)


def _loop_lines(a, kernel):
    lines = []
    for lp in a.loops:
        e = a.elements[id(lp)]
        mark = ("**main**" if lp in a.chosen else "tail" if lp in a.tails
                or a.elements[id(lp)] in (None, 1) else "alternative")
        per = f"{len(lp.instrs) / e:.1f}" if e else "-"
        lines.append(f"| `{kernel}` | 0x{lp.first:04x} | {mark} | {len(lp.instrs)} "
                     f"| {lp.count('LDG', 'LD')} ({lp.bytes_of('LDG', 'LD')} B) "
                     f"| {lp.count('STG', 'ST')} ({lp.bytes_of('STG', 'ST')} B) "
                     f"| {lp.count('BRA')} | {loads_before_use(lp)} "
                     f"| {'-' if e is None else f'{e:g}'} | {per} |")
    return lines


def render(sigs, modelled, seconds):
    lines = [
        "# CUDA kernels on sm_90, statically: occupancy, SASS per element, modelled bandwidth",
        "",
        "Generated by `python bench/gpu_static.py` (no GPU: numba-cuda's `compile_ptx`, "
        "`ptxas -v -arch=sm_90` with each kernel's `max_registers`, `nvdisasm -c` of the cubin) "
        f"in {seconds:.0f} s. Nothing here is measured; `bench/gpu_check.sh` measures on a GPU.",
        "",
        "## Key cases: the modelled fraction of H200 copy bandwidth",
        "",
        "| case | block x resident per SM (limit) | registers | SASS / element, main loops "
        "| whole kernel / element | loads in flight / thread (bytes each) "
        "| bytes in flight / SM | rows in flight x row vs L2 | issue / HBM / latency "
        "| modelled | copy | fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in modelled:
        c, a = r["case"], r["analysis"]
        size = ("x".join(str(d) for d in c.shape) if len(c.shape) == 2
                else f"2**{int(math.log2(c.shape[0]))}")
        loops = " + ".join(f"{len(lp.instrs) / a.elements[id(lp)]:.1f}" for lp in a.chosen)
        flight = ", ".join(f"{n} ({b:g})" for n, b in r["in_flight"])
        per_sm = " / ".join(f"{r['resident_threads'] * n * b / 1024:.0f} KiB"
                            for n, b in r["in_flight"])
        if "working" in r:
            fit = "fits: later passes hit L2" if r["hit"] == 1 else (
                f"exceeds: later passes {r['hit']:.0%} from L2 ({c.pass2_order} walk)")
            what = "input row, gradient evict-first" if r["streamed"] else "input + gradient rows"
            l2 = (f"{r['in_flight_rows']} x {_mb(r['working'] / r['in_flight_rows'])} "
                  f"({what}) = {_mb(r['working'])}: {fit}")
        else:
            l2 = "no reuse"
        t = r["times"]
        second = ""
        if "second" in r:
            s = r["second"]
            second = f" + {_us(s['time'])} (`{s['kernel']}`)"
        lines.append(
            f"| {c.name} {size} | {r['threads']} x {r['resident']} = {r['resident_threads']} "
            f"({r['limit'] if r['resident'] == r['fits'] else 'row_grid'}) "
            f"| {a.usage.registers} | {loops} = **{r['loop_instrs']:.1f}** "
            f"| {r['whole']:.1f} | {flight} | {per_sm} | {l2} "
            f"| {_us(t['issue'])} / {_us(t['HBM'])} / {_us(t['latency'])} "
            f"| {_us(r['kernel_time'])} ({r['bound']}){second} | {_us(r['copy'])} "
            f"| **{r['fraction']:.0%}** |")
    lines += ["", f"Bytes in flight per SM needed to cover HBM latency: {HBM / SMS / 1e9:.1f} GB/s "
              f"x {HBM_LATENCY * 1e9:.0f} ns = {NEEDED_IN_FLIGHT / 1024:.1f} KiB "
              "(\"bytes in flight / SM\" lists one figure per main loop)."]
    lines += ["", "### What limits each case", ""] + _reading(modelled)
    lines += ["", "### The loops each key case's kernel has", "",
              "Every inner loop (holding no other loop) with global loads; **main** are the "
              "element loops counted above. Instructions are the loop body's, each counted once "
              "(both sides of a branch in the body included: an upper bound of what one "
              "iteration issues).", "",
              "| kernel | address | role | instructions | global loads | global stores "
              "| branches | loads before first use | elements / iteration "
              "| instructions / element |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in modelled:
        lines += [f"| **{r['case'].name}** | | | | | | | | | |"]
        lines += _loop_lines(r["analysis"], r["case"].kernel)
        a = r["analysis"]
        if a.lightest and set(a.lightest) != set(a.chosen):
            light = sum(len(lp.instrs) / a.elements[id(lp)] for lp in a.lightest)
            lines.append("| the lightest sequence instead: "
                         + " + ".join(f"0x{lp.first:04x}" for lp in a.lightest)
                         + f" | | | | | | | | | {light:.1f} |")
        if "second" in r:
            s = r["second"]
            lines.append(f"| second stage: `{s['kernel']}` over {s['partials']:,} partials, "
                         f"1 block of {s['threads']} | | | | | | | {s['loads_in_flight']} | | "
                         f"{(s['per_elem'] or 0):.1f} |")
    lines += ["", "## The model", ""] + MODEL_TEXT + ["", "## Every kernel", ""]
    lines += _kernel_table(sigs, modelled)
    return "\n".join(lines) + "\n"


def _reading(modelled):
    out = []
    for r in modelled:
        c, a = r["case"], r["analysis"]
        flights = [r["resident_threads"] * n * b for n, b in r["in_flight"]]
        why = {"latency": f"{r['resident_threads']} resident threads per SM x "
                          + " / ".join(f"{n} loads x {b:g} B" for n, b in r["in_flight"])
                          + " = " + " / ".join(f"{f / 1024:.0f} KiB" for f in flights)
                          + f" in flight, of the {NEEDED_IN_FLIGHT / 1024:.1f} KiB that cover "
                          "HBM latency",
               "issue": f"{r['whole']:.0f} warp-thread instructions per element over the "
                        "whole kernel",
               "HBM": f"{(r['compulsory'] + r['reread']) / r['compulsory']:.2f} x the "
                      "compulsory traffic"}[r["bound"]]
        occ = (f"{r['resident']} block(s) of {r['threads']} per SM, limited by "
               + (f"{r['limit']} ({a.usage.registers} registers per thread)"
                  if r["resident"] == r["fits"] else "the blocks `row_grid` starts per SM"))
        line = f"- **{c.name}**: {r['bound']}-bound ({why}); {occ}."
        if "second" in r:
            s = r["second"]
            line += (f" Then `{s['kernel']}` sums {s['partials']:,} partials in one block of "
                     f"{s['threads']} threads with {s['loads_in_flight']} load(s) in flight "
                     f"each: {_us(s['time'])}, {s['time'] / r['total']:.0%} of the modelled time.")
        out.append(line)
    out += [f"- {note}." for r in modelled for note in r["notes"]]
    ce = {r["case"].dtype: r for r in modelled if r["case"].kernel == "cross_entropy_kernel"}
    if "float32" in ce:
        a = ce["float32"]["analysis"]
        passes = " + ".join(f"{len(lp.instrs) / a.elements[id(lp)]:.1f}" for lp in a.chosen)
        out.append(f"- Issue 16's targets: the float32 CE main loops take {passes} SASS "
                   "instructions per element (its passes in order; target: at most 30 in the main "
                   "loop); the modelled CE fraction of copy bandwidth at 4096x131072 is "
                   + ", ".join(f"{r['fraction']:.0%} in {d}" for d, r in ce.items())
                   + " (target: 80% or more).")
    return out


MODEL_TEXT = [
    f"- **sm_90 limits per SM** (H100 and H200): {SM_REGISTERS:,} registers allocated per warp "
    f"in units of {REGISTER_UNIT}, {SM_WARPS} warps ({SM_WARPS * WARP:,} threads), "
    f"{SM_BLOCKS} blocks, {SM_SHARED // 1024} KB shared memory (allocated per block in units of "
    f"{SHARED_UNIT} bytes). Resident blocks = the least of the four.",
    "- **Launch shape**: row kernels as `_rows.row_loss` launches them: "
    "`_blocks.fit(kernel, threads_for(columns))` threads, `row_grid(rows, threads)` blocks on "
    f"{SMS} SMs (its blocks per SM, if fewer than fit, give the resident count: "
    "\"row_grid\" in the limit column); elementwise kernels `grid_for(n)`.",
    "- **Loops** come from the SASS's control-flow graph: basic blocks split at branches and "
    "their labels, natural loops from back edges (a branch to a block that dominates it). "
    "The **element loops** are the inner loops with global loads (`LDG`; for a kernel that "
    "only stores per element, `STG`); when one of them handles more than one element per "
    "iteration, those are candidates for the main loops and the one-element loops are the "
    "tails after them (fewer iterations than the unroll factor per row and thread); "
    "otherwise every element loop is a candidate. Candidates run one after another (passes "
    "over a row) when one's header is reachable from the other's exits without passing the "
    "header of the loop enclosing them (the next row); those that are not are alternatives "
    "(code paths for different cases: one of them runs). The **main loops** are the "
    "sequence of candidates with the most instructions per element; the table of loops "
    "marks the others \"alternative\" and gives the lightest sequence's count too (which "
    "path a call takes depends on its arguments, e.g. label smoothing).",
    "- **Elements per iteration** = bytes the body's global loads read / the itemsizes of "
    "the arguments the kernel reads per element (`LOADS_PER_ELEMENT` in this file; a vector "
    "load counts its width). **SASS per element** = the main loops' instructions / their "
    "elements per iteration, summed over the passes. **Whole kernel per element** adds the "
    "rest of the kernel's reachable instructions (each once: prologue, block reductions, "
    "tails; not the alternatives) once per row (row kernels) or per thread (elementwise), "
    "over the elements a "
    "thread handles there; where a thread handles one element, that is the whole kernel.",
    "- **Loads in flight per thread**: the global loads of one pass over the loop body, in "
    "address order from its header, before the first instruction that reads a loaded "
    "register (issue is in order: a thread stalls there).",
    f"- **Machine** (H200 SXM): {SMS} SMs, {CLOCK / 1e9:.2f} GHz boost, {SCHEDULERS} warp "
    f"schedulers per SM each issuing one warp instruction per cycle, {HBM / 1e12:.1f} TB/s "
    f"HBM3e, {L2 / 1e6:.0f} MB L2, HBM latency {HBM_LATENCY * 1e9:.0f} ns, L2 hit latency "
    f"{L2_LATENCY * 1e9:.0f} ns (an assumption).",
    "- **Kernel time** = max(issue, HBM, latency). Issue = warp instructions (whole kernel "
    "per element x elements / 32) / (SMs x 4 x clock), assuming enough eligible warps. "
    "HBM = (compulsory traffic + later passes' misses) / 4.8 TB/s. Latency (Little's law) = "
    "sum over the main loops of the bytes they load / (SMs x resident threads x loads in "
    "flight x bytes per load / latency), HBM latency for the first pass and for misses, "
    "L2's for hits.",
    "- **Later passes and L2**: rows in flight = resident blocks per SM x SMs (one row per "
    "block at a time); their working set = rows in flight x (row of input + row of gradient), "
    "or the input rows alone when every store of the element loops is evict-first "
    "(`st.global.cs`, SASS `STG.E.EF`: L2 evicts those lines before the others, so the "
    "gradient written once does not push out the rows a later pass re-reads). "
    "Within 50 MB every later pass hits L2; beyond it, a forward walk misses entirely "
    "(each row is re-read in the order it was read, the pattern that LRU loses), a reverse "
    "walk hits for the share of the working set that L2 holds (`pass2_order` in `CASES`).",
    "- **Passes of the fast row loops** (CE, focal: `fast_row_passes` in `CASES`): pass 1 "
    "is two loops, the steps before the target's and those after it, each element in one "
    "of them (the heavier is counted, once); pass 2 is the loop that stores; the last "
    "block's total over the per-row losses, once per call, is not an element loop.",
    "- **Copy time** = compulsory traffic / 4.8 TB/s: the input(s) read once and the "
    "gradient written once (labels, losses and partials are left out: under 0.01%). "
    "**Fraction** = copy time / modelled time (the elementwise cases add their second "
    "stage, one block summing the per-block partials from L2, issue-bound on one SM or "
    "latency-bound).",
]


def _kernel_table(sigs, modelled):
    from fastloss.cuda import _blocks
    case_block = {r["case"].kernel: r["threads"] for r in modelled}
    by_kernel = defaultdict(list)
    for m, k, s, a in sigs:
        by_kernel[(m, k.py_func.__name__)].append((k, s, a))
    lines = ["All signatures of every `ptx_signatures()`. Block: the key case's launch where "
             "there is one, else the kernel's `largest_block` (the most its launcher starts; "
             "the shape of other launches depends on the call). Ranges are over the "
             "signatures. SASS per element: the main loops (see the rule); \"per iteration\" "
             "where the kernel's element is not defined here (not in `LOADS_PER_ELEMENT`); "
             "\"no element loop\" where no inner loop makes a global access.", "",
             "| kernel | signatures | block | registers | spills (bytes) | shared (bytes) "
             "| resident threads / SM (limit) | main loops | SASS / element (or / iteration) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (module, name), entries in sorted(by_kernel.items()):
        k = entries[0][0]
        block = case_block.get(name, _blocks.largest_block(k))
        regs = [a.usage.registers for _, _, a in entries]
        spills = max(a.usage.spill_stores + a.usage.spill_loads for _, _, a in entries)
        shared = max(a.usage.shared for _, _, a in entries)
        occ = [occupancy(a.usage.registers, block, a.usage.shared) for _, _, a in entries]
        lo = min(occ)
        threads = sorted({b * block for b, _ in occ})
        nloops = sorted({len(a.chosen) for _, _, a in entries})
        per = [per_element(a) for _, _, a in entries]
        if all(p is not None for p in per):
            figure = f"{min(per):.1f}-{max(per):.1f}" if len(set(per)) > 1 else f"{per[0]:.1f}"
            odd = [a.elements[id(lp)] for _, _, a in entries for lp in a.chosen
                   if a.elements[id(lp)] != int(a.elements[id(lp)])]
            if odd:  # a loop loads a per-element argument in one pass and not another
                figure += f" (some loops load {min(odd):g}-{max(odd):g} elements' bytes)"
        else:
            its = [len(lp.instrs) / max(1, lp.count("LDG", "LD", "STG", "ST"))
                   for _, _, a in entries for lp in a.chosen]
            figure = (f"{min(its):.0f}-{max(its):.0f} per global access" if its
                      else "no element loop")
        lines.append(
            f"| `{module}.{name}` | {len(entries)} | {block} | {min(regs)}-{max(regs)} "
            f"| {spills} | {shared} | {threads[0]}-{threads[-1]} ({lo[1]}) "
            f"| {'-'.join(map(str, nloops))} | {figure} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-static.md"))
    parser.add_argument("--jobs", type=int, default=2, help="ptxas/nvdisasm processes at once")
    parser.add_argument("--kernels", nargs="*", help="only these kernels (by name)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sigs, cases = compile_all(args.jobs, set(args.kernels) if args.kernels else None)
    modelled = [model(c, main_, second) for c, main_, second in cases]
    report = render(sigs, modelled, time.perf_counter() - start)
    Path(args.out).write_text(report)
    print(report.split("### The loops")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
