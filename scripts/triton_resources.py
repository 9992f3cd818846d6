"""Compile every Triton kernel of ``l2p_fast.kernels`` for real GPUs, on a machine without one.

Each configuration comes from the launchers themselves: the script calls the real host launchers
(``LAUNCHERS``: the pool, the sequence assembly, DualPrompt's prefix gather) on CPU tensors with every kernel
replaced by a recorder, so the block sizes, flags, dtypes, warps and Triton's own argument
specialisation (alignment, ``== 1`` integers) are exactly what a GPU launch would compile; autotuned
kernels expand to every config of their autotune list. Each distinct configuration is then compiled
ahead of time (``triton.compile`` with a ``GPUTarget``; ptxas ships inside Triton) for sm_80 and
sm_90, and the bundled ``cuobjdump --dump-resource-usage`` reads registers, stack and shared memory
from the cubin. A non-zero STACK is a register spill (these kernels keep no local arrays; the LOCAL
column stays 0 even when ptxas spills).

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces @triton.jit functions by objects
the compiler cannot read); ``tests/test_triton_compile.py`` starts it in a subprocess for that.

    python scripts/triton_resources.py                 # full sweep → table on stdout
    python scripts/triton_resources.py --subset ci     # the CI subset
    python scripts/triton_resources.py --json out.json --markdown out.md --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import itertools
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_resources: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled for a GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
# ptxas keeps a few bytes of select_kernel on the stack in some flag/dtype combinations whatever its block sizes
# (8-24 B at 56-142 registers; also before the NaN handling): that much is allowed there, nothing larger
# (BLOCK_M = 64 spilled ~700 B in fp64) and nothing anywhere else. See docs/design/gpu-resources.md.
ALLOWED_STACK_BYTES = {"select_kernel": 32}
KERNEL_PACKAGE = "l2p_fast.kernels"
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# dtype families: (x_embed, prompt and keys). The similarity stage computes in fp32 for the first
# three and in fp64 for the last; the storage dtypes cover the half types and mixed promotion.
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES_CI = ((F32, F32), (BF16, F32), (F16, F16), (F64, F64))
DTYPES_FULL = tuple(itertools.product((F32, F16, BF16, F64), repeat=2))


@dataclass(frozen=True)
class Shape:
    """B batch, N tokens, D width, M pool, K top-k, Lp prompt length."""

    B: int
    N: int
    D: int
    M: int
    K: int
    LP: int


# The launchers' extremes: the largest blocks (D ≥ 128 and Lp·D ≥ 1024 saturate the width blocks, M > 32
# the pool block, B·K ≥ 64 the vote block), the smallest (every size 1) and a middle one (D = 128: the
# assembly's tallest tile). The full sweep adds the L2P shapes.
LARGEST = Shape(64, 196, 768, 40, 5, 5)
SHAPES_CI = (LARGEST, Shape(1, 1, 1, 1, 1, 1), Shape(16, 97, 128, 20, 4, 10))
# The CI subset (a few minutes of ptxas otherwise): every kernel × every flag combination × each dtype family
# at the largest blocks for both targets; the other extremes in fp32 for sm_90; autotune lists by their
# largest tile at each warp count. The full sweep compiles every configuration for both.
CI_PLAN = (((LARGEST,), DTYPES_CI, ("sm80", "sm90")), (SHAPES_CI[1:], ((F32, F32),), ("sm90",)))
SHAPES_FULL = SHAPES_CI + (
    Shape(16, 196, 768, 10, 5, 5),
    Shape(16, 196, 768, 20, 4, 10),
    Shape(16, 196, 192, 10, 5, 5),
    Shape(3, 7, 123, 33, 3, 2),
    Shape(128, 196, 1024, 100, 10, 8),
)


@dataclass
class Launch:
    """One configuration of one kernel, as the launcher would compile it on a GPU."""

    kernel: str  # module.function
    signature: dict
    constexprs: dict  # {(index,): value}
    attrs: dict
    options: dict
    label: str = ""  # what the launcher was asked to do

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))

    def family(self) -> str:
        """The key without Triton's value specialisations (integers equal to 1, alignment): the kernel,
        its pointer dtypes, its declared constexprs and options. The ci and families subsets compile one launch
        per family."""
        fn = _jit_function(self.kernel)
        declared = {(i,) for i, p in enumerate(fn.params) if p.is_constexpr}
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.options.items()),
                     sorted((k, v) for k, v in self.constexprs.items() if k in declared)))

    def config(self) -> str:
        """The constexpr values and options, for the table."""
        fn = _jit_function(self.kernel)
        names = {(i,): p.name for i, p in enumerate(fn.params)}
        parts = [f"{names[k]}={v}" for k, v in sorted(self.constexprs.items())]
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        return " ".join(parts + [f"{k}={v}" for k, v in sorted(self.options.items())] + ["/".join(dtypes)])


@dataclass
class Result:
    kernel: str
    target: str
    config: str
    label: str
    registers: int = -1
    stack: int = -1
    shared: int = -1
    resident_warps: int = -1  # warps per SM its registers allow
    seconds: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> bool:
        """Stack beyond what the kernel is allowed (``ALLOWED_STACK_BYTES``)."""
        return self.stack > ALLOWED_STACK_BYTES.get(self.kernel.rsplit(".", 1)[1], 0)


# ---------------------------------------------------------------------------------------------------
# Recording the launchers' configurations
# ---------------------------------------------------------------------------------------------------


def kernel_modules() -> list:
    """Every module of the kernels package."""
    package = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]


def entry_kernels() -> list[str]:
    """Every @triton.jit function of the kernels package that a launcher starts (named ``*_kernel``)."""
    found = set()
    for module in kernel_modules():
        for name, value in vars(module).items():
            fn = value.fn if isinstance(value, Autotuner) else value
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                found.add(f"{fn.__module__}.{fn.__name__}")
    return sorted(found)


def _jit_function(qualified: str) -> JITFunction:
    module, name = qualified.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    return fn.fn if isinstance(fn, Autotuner) else fn


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn: JITFunction, configs: list | None, sink: list, label: Callable[[], str]) -> None:
        self.fn, self.configs, self.sink, self.label = fn, configs, sink, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for config in self.configs or [None]:
                merged = dict(kwargs)
                if config is not None:
                    merged.update(config.all_kwargs())
                self.sink.append((self.fn, args, merged, self.label()))

        return launch


def _largest_configs(configs: list) -> list:
    """The largest tile of an autotune list at each warp count (the configs that could spill)."""
    def tile(config) -> int:
        product = 1
        for value in config.kwargs.values():
            product *= value
        return product

    return [max((c for c in configs if c.num_warps == warps), key=tile)
            for warps in sorted({c.num_warps for c in configs})]


def _specialise(fn: JITFunction, args: tuple, kwargs: dict, backend) -> Launch:
    """Signature, constexprs and attributes exactly as ``JITFunction.run`` derives them for ``backend``."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    chosen = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs and kwargs[k] is not None}
    chosen.setdefault("num_warps", 4)
    return Launch(f"{fn.__module__}.{fn.__name__}", dict(signature), dict(constexprs), dict(attrs), chosen)


@contextlib.contextmanager
def recording(sink: list, label: Callable[[], str], full_autotune: bool = True) -> Iterator[None]:
    """Replace every kernel of the kernels package by a recorder while the block runs (autotuned kernels:
    every config, or with ``full_autotune=False`` the largest tile at each warp count: the one that could spill)."""
    saved = []
    for module in kernel_modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, Autotuner):
                saved.append((module, name, value))
                configs = list(value.configs) if full_autotune else _largest_configs(value.configs)
                setattr(module, name, _Recorder(value.fn, configs, sink, label))
            elif isinstance(value, JITFunction):
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, None, sink, label))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


LAUNCHERS = {  # module: the launchers it must have
    "l2p_fast.ops.pool_triton": ("launch_pool_forward", "launch_vote_counts", "launch_prepend", "launch_grad_prompt",
                                 "launch_grad_similarity", "launch_grad_x"),
    "l2p_fast.ops.assemble_triton": ("launch_assemble", "launch_prompt_grad"),
    "l2p_fast.ops.prefix_gather_triton": ("launch_gather", "launch_gather_grad"),
    "l2p_fast.ops.coda_triton": ("launch_weights", "launch_rows", "launch_rowdot", "launch_weight_grads"),
}


def _launchers() -> list:
    """The host launcher modules (looked up by name so a moved launcher fails here with a clear message)."""
    modules = [importlib.import_module(name) for name in LAUNCHERS]
    missing = [f"{m.__name__}.{n}" for m, names in zip(modules, LAUNCHERS.values(), strict=True) for n in names
               if not hasattr(m, n)]
    if missing:
        raise RuntimeError(f"triton_resources: launchers not found (moved?): {missing}; update LAUNCHERS")
    return modules


def _pool_scenarios(pool, shape: Shape, dtypes: tuple, full: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """Every flag combination of the pool's forward and backward launchers at one shape and dtype pair."""
    x_dtype, p_dtype = dtypes
    B, N, D, M, K, LP = shape.B, shape.N, shape.D, shape.M, shape.K, shape.LP
    x = torch.empty((B, N, D), dtype=x_dtype)
    prompt = torch.empty((M, LP, D), dtype=p_dtype)
    keys = torch.empty((M, D), dtype=p_dtype)
    cls = torch.empty((B, D), dtype=x_dtype)
    mask = torch.zeros((B, K), dtype=torch.int64)
    ct = torch.promote_types(torch.promote_types(x_dtype, p_dtype), torch.float32)
    out_dtype = torch.promote_types(p_dtype, x_dtype)
    for mode, (masked, batchwise) in itertools.product((0, 1, 2, 3), ((True, False), (False, False), (False, True))):
        def forward(mode=mode, masked=masked, batchwise=batchwise):
            pool.launch_pool_forward(x, prompt, keys, cls if mode == 3 else None, mask if masked else None,
                                     mode, K, batchwise)
        yield f"forward mode={mode} mask={masked} vote={batchwise}", forward
    freq, counts = torch.zeros((M,), dtype=p_dtype), torch.zeros((M,), dtype=torch.int64)
    for mode, batchwise in itertools.product((0, 1, 2, 3), (False, True)):
        def selection(mode=mode, batchwise=batchwise):  # diversified selection; with the vote: given counts
            pool.launch_pool_forward(x, prompt, keys, cls if mode == 3 else None, None, mode, K, batchwise, freq,
                                     counts if batchwise else None)
        yield f"forward mode={mode} frequency vote_counts={batchwise}", selection
        yield f"vote counts mode={mode} frequency={batchwise}", lambda mode=mode, batchwise=batchwise: (
            pool.launch_vote_counts(x, keys, cls if mode == 3 else None, freq if batchwise else None, mode, K))
    idx = torch.zeros((B, K), dtype=torch.int64)
    grad_out = torch.empty((B, K * LP + N, D), dtype=out_dtype)
    small = [torch.empty(s, dtype=ct) for s in ((M, D), (B, D), (B, M), (B, K, D), ())]
    kss, qss = torch.empty((M,), dtype=ct), torch.empty((B,), dtype=ct)
    yield "grad prompt", lambda: pool.launch_grad_prompt(grad_out, idx, M, LP, p_dtype)
    for present in itertools.product((False, True), repeat=5):
        if not full and present not in ((True,) * 5, (False, False, False, False, True), (False,) * 5):
            continue
        grads = [g if p else None for g, p in zip(small, present, strict=True)]
        yield f"grad similarity {present}", lambda grads=grads: pool.launch_grad_similarity(
            *grads, idx, small[0], small[1], kss, qss, p_dtype)
    argmax = torch.zeros((B, D), dtype=torch.int32)
    gq = torch.empty((B, D), dtype=ct)
    for mode, has_g in itertools.product((0, 1, 2, 3), (True, False)):
        yield f"grad x mode={mode} g={has_g}", lambda mode=mode, has_g=has_g: pool.launch_grad_x(
            grad_out if has_g else None, gq, argmax, mode, N, K * LP, x_dtype)
    yield "prepend", lambda: pool.launch_prepend(torch.empty((LP, D), dtype=p_dtype), x)


def _assembly_scenarios(assembly, shape: Shape, dtypes: tuple) -> Iterator[tuple[str, Callable[[], None]]]:
    x_dtype, p_dtype = dtypes
    B, N, D, M, K, LP = shape.B, shape.N, shape.D, shape.M, shape.K, shape.LP
    x = torch.empty((B, N, D), dtype=x_dtype)
    prompt = torch.empty((M, LP, D), dtype=p_dtype)
    idx = torch.zeros((B, K), dtype=torch.int64)
    cls = torch.empty((1, 1, D), dtype=p_dtype)
    seq = 1 + K * LP + N
    for has_pos in (True, False):
        pos = torch.empty((1, seq, D), dtype=p_dtype) if has_pos else None
        yield f"assemble pos={has_pos}", lambda pos=pos: assembly.launch_assemble(x, prompt, idx, cls, pos)
    out_dtype = torch.promote_types(x_dtype, p_dtype)
    grad = torch.empty((B, seq, D), dtype=out_dtype)
    yield "assembly prompt grad", lambda: assembly.launch_prompt_grad(grad, idx, M, LP)


def _prefix_gather_scenarios(prefix, shape: Shape, dtypes: tuple) -> Iterator[tuple[str, Callable[[], None]]]:
    """DualPrompt's prefix gather: prompt (L, C, M, R) with L = 2 layers, C = 2 (key/value), R = Lp·D."""
    p_dtype = dtypes[1]
    prompt = torch.empty((2, 2, shape.M, shape.LP * shape.D), dtype=p_dtype)
    idx = torch.zeros((shape.B, shape.K), dtype=torch.int64)
    for batch_first in (True, False):
        out_shape = (2, shape.B, 2, shape.K, prompt.shape[-1]) if batch_first else (2, 2, shape.B, shape.K,
                                                                                     prompt.shape[-1])
        grad = torch.empty(out_shape, dtype=p_dtype)
        yield f"prefix gather batch_first={batch_first}", lambda b=batch_first: prefix.launch_gather(prompt, idx, b)
        yield f"prefix gather grad batch_first={batch_first}", lambda b=batch_first, g=grad: prefix.launch_gather_grad(
            g, idx, shape.M, b)


def _coda_scenarios(coda, shape: Shape, dtypes: tuple) -> Iterator[tuple[str, Callable[[], None]]]:
    """CODA-Prompt's mix: q (B, D), keys/attn (M, D), prompt rows (M, Lp·D), in the parameters' dtype."""
    p_dtype = dtypes[1]
    q = torch.empty((shape.B, shape.D), dtype=p_dtype)
    keys = torch.empty((shape.M, shape.D), dtype=p_dtype)
    rows = torch.empty((shape.M, shape.LP * shape.D), dtype=p_dtype)
    weights = torch.empty((shape.B, shape.M), dtype=p_dtype)
    grad = torch.empty((shape.B, shape.LP * shape.D), dtype=p_dtype)
    yield "coda weights", lambda: coda.launch_weights(q, keys, keys, p_dtype)
    yield "coda mix", lambda: coda.launch_rows(weights, False, rows, shape.B, 0, shape.B, p_dtype)
    yield "coda grad prompt", lambda: coda.launch_rows(weights, True, grad, shape.M, 0, shape.M, p_dtype)
    yield "coda grad weights", lambda: coda.launch_rowdot(grad, rows, weights)
    yield "coda grad weights no base", lambda: coda.launch_rowdot(grad, rows, None)
    grad_w = torch.empty((shape.B, shape.M), dtype=torch.promote_types(p_dtype, torch.float32))
    yield "coda grad q, keys, attn", lambda: coda.launch_weight_grads(q, keys, keys, weights, grad_w, 0)


def record_launches(subset: str, targets: tuple[str, ...] = tuple(TARGETS)) -> list[tuple[Launch, str]]:
    """(configuration, target) pairs: every distinct configuration the launchers pick over the subset's shapes,
    dtypes and flags, with each target (of ``targets``) the subset compiles it for."""
    full = subset in ("full", "families")
    plan = (((SHAPES_FULL, DTYPES_FULL, tuple(TARGETS)),) if full else CI_PLAN)
    exact = subset == "full"  # "families": the full space, one compile per family (see Launch.family)
    pool, assembly, prefix, coda = _launchers()
    backend = make_backend(TARGETS["sm90"])  # specialisation does not depend on the arch
    unique: dict[tuple[str, str], tuple[Launch, str]] = {}
    for shapes, dtype_pairs, plan_targets in plan:
        sink: list = []
        current = [""]
        with recording(sink, lambda current=current: current[0], full_autotune=full):
            for shape, dtypes in itertools.product(shapes, dtype_pairs):
                tag = f"{shape} x={dtypes[0]} params={dtypes[1]}".replace("torch.", "")
                for label, run in itertools.chain(_pool_scenarios(pool, shape, dtypes, full),
                                                  _assembly_scenarios(assembly, shape, dtypes),
                                                  _prefix_gather_scenarios(prefix, shape, dtypes),
                                                  _coda_scenarios(coda, shape, dtypes)):
                    current[0] = f"{label} {tag}"
                    run()
        for fn, args, kwargs, label in sink:
            launch = _specialise(fn, args, kwargs, backend)
            launch.label = label
            for target in plan_targets:
                if target in targets:
                    unique.setdefault((launch.key() if exact else launch.family(), target), (launch, target))
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------
# Compiling and reading resources
# ---------------------------------------------------------------------------------------------------

_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin_path: str) -> dict[str, dict[str, int]]:
    """{function: {registers, stack, shared, local}} from ``cuobjdump --dump-resource-usage``."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                          check=True).stdout
    usage, name = {}, None
    for line in text.splitlines():
        if line.strip().startswith("Function "):
            name = line.strip()[len("Function "):].rstrip(":")
        found = _USAGE.search(line)
        if found and name is not None:
            regs, stack, shared, local = map(int, found.groups())
            usage[name] = {"registers": regs, "stack": stack, "shared": shared, "local": local}
    return usage


def extension_usage(library: str) -> list[dict]:
    """Resource usage of every CUDA kernel in a built extension (``l2p_fast/_C*.so``): one row per (arch,
    kernel) with the demangled name, registers, stack and shared bytes. Empty when it has no device code."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True).stdout
    rows, arch, name = [], None, None
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.strip().startswith("Function "):
            name = line.strip()[len("Function "):].rstrip(":")
        elif (found := _USAGE.search(line)) and name is not None:
            regs, stack, shared, _local = map(int, found.groups())
            rows.append({"arch": arch, "kernel": name, "registers": regs, "stack": stack, "shared": shared})
    if rows:
        demangled = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows), capture_output=True,
                                   text=True).stdout.splitlines() if shutil.which("c++filt") else []
        for row, pretty in zip(rows, demangled, strict=False):
            row["kernel"] = re.sub(r"\(.*\)$", "", pretty.replace("l2p_fast::(anonymous namespace)::", ""))
    return sorted({(r["arch"], r["kernel"]): r for r in rows}.values(), key=lambda r: (r["kernel"], r["arch"]))


def extension_markdown(rows: list[dict]) -> str:
    """One line per kernel template: the most registers / stack / shared bytes over its instantiations."""
    worst: dict[str, dict] = {}
    for r in rows:
        name = re.sub(r"^void ", "", r["kernel"].split("<", 1)[0])
        entry = worst.setdefault(name, {"count": 0})
        entry["count"] += 1
        for key in ("registers", "stack", "shared"):
            entry[(r["arch"], key)] = max(entry.get((r["arch"], key), 0), r[key])
    archs = sorted({r["arch"] for r in rows})
    lines = ["| kernel (instantiations) | " + " | ".join(f"{a} registers" for a in archs) + " | stack B | shared B |",
             "| --- | " + " | ".join("---:" for _ in archs) + " | ---: | ---: |"]
    for name, e in sorted(worst.items()):
        regs = " | ".join(str(e.get((a, "registers"), "")) for a in archs)
        stack = max(e.get((a, "stack"), 0) for a in archs)
        shared = max(e.get((a, "shared"), 0) for a in archs)
        lines.append(f"| `{name}` ({e['count'] // max(1, len(archs))}) | {regs} | {stack} | {shared} |")
    return "\n".join(lines) + "\n"


def compile_one(launch: Launch, target_name: str) -> Result:
    """Compile one configuration for one target; errors are returned, not raised."""
    start = time.perf_counter()
    result = Result(launch.kernel, target_name, launch.config(), launch.label)
    try:
        fn = _jit_function(launch.kernel)
        src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(src, target=TARGETS[target_name], options=dict(launch.options))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
            handle.write(compiled.asm["cubin"])
            handle.flush()
            usage = resource_usage(handle.name)
        stats = usage.get(compiled.metadata.name) or next(iter(usage.values()))
        result.registers, result.stack = stats["registers"], stats["stack"]
        result.shared = int(compiled.metadata.shared)  # what Triton launches with (dynamic shared memory)
        result.resident_warps = occupancy_warps(result.registers, int(launch.options["num_warps"]))
    except Exception as error:  # noqa: BLE001 - a compile error is a result to report
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def _compile_star(item: tuple[Launch, str]) -> Result:
    return compile_one(*item)


def sweep(subset: str, targets: tuple[str, ...], jobs: int, only: str | None = None) -> list[Result]:
    """Record the configurations of ``subset`` and compile each for every target (``jobs`` processes);
    ``only``: a regular expression the kernel's name must match."""
    work = [(one, target) for one, target in record_launches(subset, targets)
            if only is None or re.search(only, one.kernel)]
    if jobs <= 1:
        return [_compile_star(item) for item in work]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, work, chunksize=4))


def occupancy_warps(registers: int, num_warps: int) -> int:
    """Resident warps per SM allowed by registers alone (64K registers per SM, at most 64 warps on sm_80 and
    sm_90; registers are allocated per warp in units of 256)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(64, 65536 // (per_warp * num_warps) * num_warps)


def markdown(results: list[Result]) -> str:
    lines = [
        "| kernel | target | configuration | registers | warps/SM (by registers) | stack (spill) B | shared B |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.config, r.target)):
        if r.error:
            lines.append(f"| {r.kernel.rsplit('.', 1)[1]} | {r.target} | {r.config} | ERROR: {r.error} | | | |")
            continue
        lines.append(f"| {r.kernel.rsplit('.', 1)[1]} | {r.target} | {r.config} | {r.registers} | "
                     f"{r.resident_warps} | {r.stack} | {r.shared} |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: list[Result]) -> str:
    """One row per (kernel, pointer dtypes): the most registers, stack and shared bytes and the fewest resident
    warps over every configuration compiled (flags, blocks, autotune configs), for each target."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.error is None:
            groups.setdefault((r.kernel.rsplit(".", 1)[1], r.config.rsplit(" ", 1)[1]), []).append(r)
    lines = ["| kernel | pointer dtypes | configs | registers sm_80 / sm_90 (max) | warps/SM (min) | stack B (max) | "
             "shared B (max) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (kernel, dtypes), rows in sorted(groups.items()):
        regs = " / ".join(str(max((r.registers for r in rows if r.target == t), default=0)) for t in ("sm80", "sm90"))
        lines.append(f"| {kernel} | {dtypes} | {len(rows)} | {regs} | {min(r.resident_warps for r in rows)} | "
                     f"{max(r.stack for r in rows)} | {max(r.shared for r in rows)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "families", "full"), default="full",
                        help="ci: the test's subset; families: every shape, dtype pair, flag and autotune config, "
                             "one compile per family (Triton's integer/alignment specialisations merged); full: all")
    parser.add_argument("--targets", default="sm80,sm90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernels", help="only kernels whose name matches this regular expression")
    parser.add_argument("--cuda-extension", metavar="SO", help="instead: the CUDA kernels of this built extension")
    parser.add_argument("--json", help="write every result here (JSON list)")
    parser.add_argument("--markdown", help="write the table here (default: stdout)")
    parser.add_argument("--summary", help="write the per-kernel summary table here")
    parser.add_argument("--from-json", metavar="JSON", help="no compiles: the tables of an earlier --json run")
    args = parser.parse_args(argv)
    if args.cuda_extension:
        rows = extension_usage(args.cuda_extension)
        print(extension_markdown(rows))
        return 1 if any(r["stack"] for r in rows) else 0
    start = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as handle:
            results = [Result(**r) for r in json.load(handle)["results"]]
    else:
        results = sweep(args.subset, tuple(args.targets.split(",")), args.jobs, args.kernels)
    if args.json and not args.from_json:
        with open(args.json, "w") as handle:
            json.dump({"entry_kernels": entry_kernels(), "allowed_stack_bytes": ALLOWED_STACK_BYTES,
                       "results": [asdict(r) for r in results]}, handle, indent=1)
    if args.summary:
        with open(args.summary, "w") as handle:
            handle.write(summary_markdown(results))
    table = markdown(results)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    else:
        print(table)
    errors = sum(r.error is not None for r in results)
    spills = sum(r.spills for r in results)
    print(f"{len(results)} compiles in {time.perf_counter() - start:.0f} s: {errors} errors, {spills} spilling",
          file=sys.stderr)
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
