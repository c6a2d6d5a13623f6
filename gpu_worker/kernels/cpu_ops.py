"""Native CPU kernels of the decode hot path, built on first use, with a torch path beside each one.

Kernels (C++ source: csrc/cpu_ops.cpp; fp32, bf16 and fp16 in, fp32 arithmetic, output rounded once):
    cpu_paged_decode_attention  paged decode attention that reads the cache blocks in place (no gather)
    rotary_embedding_           neox rotary embedding, in place on q and k
    add_rms_norm_               residual add + RMSNorm, in place on both tensors

Build: `torch.utils.cpp_extension.load_inline` compiles the source the first time a kernel is called (10-15 s
on 2 cores, one translation unit, needs g++ and ninja) into `$TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions) under a name keyed by the hash of the source, flags, torch and Python versions.
Later processes load that library directly, without compiler or ninja. If the build or load fails, the reason
is logged once (a warning) and every function here runs its torch path. `NPC_DISABLE_CPU_OPS=1` forces the
torch paths (read on every call). Hazard: a build killed midway leaves `<build dir>/lock`, and the next build
waits on it forever; the build's log line names the directory.

The library is compiled without -march (a cached build must run on any x86-64); each kernel is instantiated
for AVX-512, AVX2+FMA and baseline x86-64 and picked from cpuid at load time (`cpu_ops_isa`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

# Module-attribute use at call time only, so paged_attention may import this module back.
from gpu_worker.kernels import paged_attention as _attention

log = logging.getLogger(__name__)

DISABLE_ENV = "NPC_DISABLE_CPU_OPS"
SOURCE_PATH = Path(__file__).resolve().parent / "csrc" / "cpu_ops.cpp"
# -ffp-contract=fast: torch builds with -std=c++20 (not gnu++), which turns FMA contraction off.
# -Wno-psabi: the vector helpers have no target attribute of their own; they are always inlined into the
# per-ISA kernels, so the ABI gcc warns about is never used.
CFLAGS = ("-O3", "-DNDEBUG", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi")
LDFLAGS = ("-fopenmp",)  # at::parallel_for is inline OpenMP: without it the kernels run on one thread
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_ops_available() -> bool:
    """True when the native library is built and loaded and `NPC_DISABLE_CPU_OPS` is not set."""
    return _native_ops() is not None


def cpu_ops_isa(name: str = "current") -> str | None:
    """The ISA the native kernels run with ("avx512", "avx2", "base"); `name` selects one ("auto": the best
    this CPU has), for tests and benchmarks. None when the native library is not available."""
    ops = _native_ops()
    return None if ops is None else ops.select_isa(name)


def cpu_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=None):
    """`paged_decode_attention_torch`'s semantics, shapes and checks, with the native kernel when it can run.

    Native kernel: one task per (row, kv head), parallel over tasks. The task's G query heads read the row's
    blocks in place, in fp32: scores against every key, softmax over the row, weighted sum of the values.
    Slots past a row's context are never read (they may hold anything, NaN included), and neither are table
    entries past its last block. It checks 1 <= context_lens[i] <= max_blocks * block_size and the block ids
    it reads (RuntimeError), and ignores `max_context_len`. Needs CPU tensors, a unit stride on the caches'
    last dim, head_dim % 8 == 0 and the dtypes in NATIVE_DTYPES; anything else takes the torch path.
    """
    _attention._check_args(q, k_cache, v_cache, block_tables, context_lens)
    ops = _native_ops()
    if ops is None or not _native_attention_fits(q, k_cache, v_cache):
        return _attention.paged_decode_attention_torch(
            q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=max_context_len
        )
    return ops.paged_decode_attention(
        q, k_cache, v_cache, _int32(block_tables), _int32(context_lens), float(scale)
    )


def rotary_embedding_(positions, q, k, cos, sin) -> None:
    """Neox (rotate-half) rotary embedding in place, with the native kernel when it can run.

        for x in (q, k), each token t, head h, i < D/2, with c = cos[positions[t]], s = sin[positions[t]]:
            x1, x2 = x[t, h, i], x[t, h, i + D/2]
            x[t, h, i]       = x1 * c[i]       - x2 * s[i]
            x[t, h, i + D/2] = x2 * c[i + D/2] + x1 * s[i + D/2]
    in fp32, rounded once to x's dtype (RotaryEmbedding.apply_ rounds after each op).

    Args:
        positions: [T] int64 (or int32), each in [0, P).
        q: [T, H, D], k: [T, Hkv, D] or None; strided views (of a fused qkv output) are fine as long as D
            has unit stride. With k None, q may be the q and k heads together: qkv[:, :(H + Hkv) * D] viewed
            as [T, H + Hkv, D].
        cos, sin: [P, D], same dtype as q and k (RotaryEmbedding's tables).
    """
    ops = _native_ops()
    tensors = [t for t in (q, k, cos, sin) if t is not None]
    if ops is not None and all(_native_tensor(t) for t in tensors) and len({t.dtype for t in tensors}) == 1:
        ops.rotary_embedding_(q, k, positions, cos, sin)
        return
    rotary_embedding_torch_(positions, q, k, cos, sin)


def rotary_embedding_torch_(positions, q, k, cos, sin) -> None:
    """Torch path of `rotary_embedding_`, same semantics (fp32, one rounding)."""
    cos_rows = cos[positions].float().unsqueeze(1)  # [T, 1, D]
    sin_rows = sin[positions].float().unsqueeze(1)
    for x in (q, k):
        if x is None:
            continue
        xf = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        x.copy_(xf * cos_rows + rotated * sin_rows)


def add_rms_norm_(x, residual, weight, eps: float) -> None:
    """Residual add + RMSNorm in place (vLLM's fused_add_rms_norm), with the native kernel when it can run.

        residual += x                                          (rounded to the dtype)
        x[:] = rms_norm(residual, weight, eps)                 = RMSNorm.forward(residual)
    where rms_norm(r) = r * rsqrt(mean(r^2) + eps) * weight with the mean in fp32; for half types the
    normalized row is rounded to the dtype before the weight multiplies it, as RMSNorm.forward does.
    Before: x is a sublayer's output, residual the stream it adds to; after: residual is the new stream and
    x the next sublayer's input.

    Args:
        x, residual: [T, N], unit stride on N; weight: [N]; all one dtype.
    """
    ops = _native_ops()
    if ops is not None and all(_native_tensor(t) for t in (x, residual, weight)):
        ops.add_rms_norm_(x, residual, weight, float(eps))
        return
    add_rms_norm_torch_(x, residual, weight, eps)


def add_rms_norm_torch_(x, residual, weight, eps: float) -> None:
    """Torch path of `add_rms_norm_`, same semantics."""
    residual.add_(x)
    stream = residual.float()
    normed = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype == torch.float32:
        x.copy_(normed * weight)
    else:
        x.copy_(weight * normed.to(x.dtype))


def _native_attention_fits(q, k_cache, v_cache):
    # q of any strides (the kernel copies one without unit stride on D); the caches are never copied.
    q_fits = q.device.type == "cpu" and q.dtype in NATIVE_DTYPES and q.shape[-1] % 8 == 0
    return q_fits and _native_tensor(k_cache) and _native_tensor(v_cache)


def _native_tensor(t):
    return t.device.type == "cpu" and t.dtype in NATIVE_DTYPES and t.stride(-1) == 1


def _int32(t):
    return t if t.dtype == torch.int32 else t.to(torch.int32)


class _NativeLibrary:
    """Builds or loads the library once per process; remembers a failure so it is logged once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tried = False
        self.ops = None

    def get(self):
        if not self.tried:
            with self.lock:
                if not self.tried:
                    self.ops = _load_or_build()
                    self.tried = True
        return self.ops


_library = _NativeLibrary()


def _native_ops():
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    return _library.get()


def _load_or_build():
    try:
        source = SOURCE_PATH.read_text()
        name = _library_name(source)
        build_dir = _build_root() / name
        library_file = build_dir / f"{name}.so"
        start = time.perf_counter()
        if library_file.exists() and not (build_dir / "lock").exists():
            torch.ops.load_library(str(library_file))
            log.info("native CPU ops: loaded %s", library_file)
        else:
            _build(name, source, build_dir)
            log.info("native CPU ops: built %s in %.1f s", library_file, time.perf_counter() - start)
        ops = torch.ops.npc_cpu_ops
        log.info("native CPU ops: running with %s", ops.select_isa("current"))
        return ops
    except Exception as error:  # no compiler, no ninja, a compile error, an unloadable library...
        log.warning("native CPU ops unavailable, using the torch paths: %s", _trim(str(error)))
        return None


def _build(name, source, build_dir):
    from torch.utils.cpp_extension import load_inline

    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("native CPU ops: compiling %s (once, ~15 s; if this hangs, delete %s/lock: a killed build's)",
             name, build_dir)
    with _ninja_on_path():
        load_inline(
            name=name, cpp_sources=[source], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir), is_python_module=False, no_implicit_headers=True,
        )


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` from PATH; a pip-installed ninja sits in the venv's bin, which is not on PATH when
    the venv's python is run without activating it (as the Makefile does)."""
    if shutil.which("ninja"):
        yield
        return
    found = next((d for d in _ninja_dirs() if (d / "ninja").is_file()), None)
    old_path = os.environ.get("PATH", "")
    if found is not None:
        os.environ["PATH"] = f"{found}{os.pathsep}{old_path}"
    try:
        yield  # without ninja anywhere, torch raises "Ninja is required to load C++ extensions"
    finally:
        os.environ["PATH"] = old_path


def _ninja_dirs():
    dirs = [Path(sys.executable).parent]
    with contextlib.suppress(ImportError):
        import ninja

        dirs.insert(0, Path(ninja.BIN_DIR))
    return dirs


def _library_name(source):
    key = "\n".join([source, *CFLAGS, *LDFLAGS, torch.__version__, sys.implementation.cache_tag])
    return f"npc_cpu_ops_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _build_root():
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _trim(message, limit=3000):
    # A compile error carries the whole compiler output; its end names the problem.
    return message if len(message) <= limit else "..." + message[-limit:]
