"""Numeric mode: which CPU code paths decide the bytes of every artifact, pinned and recorded.

The same model, data, code and seed give different bytes on different CPUs unless three libraries
take the same code path (measured in benchmarks/RESULTS.md, "Deterministic numerics"):

- ATen picks its vectorised kernels (AVX2, AVX-512...) from the CPU at first use
  (``ATEN_CPU_CAPABILITY``); an AVX-512 kernel sums in another order than the AVX2 one.
- MKL, which torch's CPU build uses for matmul and LAPACK (GPTQ's Cholesky), picks its kernels the
  same way; Conditional Numerical Reproducibility (``MKL_CBWR=AVX2,STRICT``) fixes the branch, and
  STRICT also makes the result independent of the thread count.
- oneDNN (bf16 matmul, AMX) picks its ISA (``ONEDNN_MAX_CPU_ISA``).

Modes (measured in benchmarks/RESULTS.md, "Deterministic numerics on AMD"):

- ``deterministic`` (the default of the CLI and the pipeline) pins all three to AVX2. MKL grants its
  AVX2 branch on Intel CPUs only: on any other x86-64 CPU (AMD EPYC) it serves its AUTO branch,
  still STRICT. So the same inputs give the same bytes on every Intel machine (with or without
  AVX-512/AMX) and at any thread count; on an AMD machine the MKL branch, recorded in :func:`key`,
  differs, and so do the bytes (measured), and MKL's AUTO branch may pick its kernels by CPU model.
- ``portable`` pins MKL to its COMPATIBLE branch (SSE2 code, the one branch MKL runs alike on every
  x86-64 CPU) and ATen/oneDNN to AVX2: the same bytes on Intel and AMD alike, at about 4x the time
  of an fp32 matmul (measured on an AMD EPYC: 219 against 52 ms).
- ``native`` lets each library pick the fastest path for the CPU.

The environment is read by each library when it first runs, so :func:`pin` must be called before
torch computes anything (the CLI does it before importing torch); :func:`activate` checks it took
effect. The mode is chosen with ``QALORA_NUMERICS``.

This module imports torch lazily: importing it must not initialise the libraries it pins.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

MODE_ENV = "QALORA_NUMERICS"
MODES = ("deterministic", "portable", "native")
DEFAULT_MODE = "deterministic"

# The environment each pinned mode sets. CUBLAS_WORKSPACE_CONFIG makes cuBLAS deterministic run to
# run on one GPU model (torch.use_deterministic_algorithms needs it).
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
MODE_ENV_VALUES = {"deterministic": PINNED_ENV, "portable": PINNED_ENV | {"MKL_CBWR": "COMPATIBLE,STRICT"}}
_ATEN_EXPECTED = "AVX2"
# mkl_cbwr.h: branches AUTO 2, COMPATIBLE 3, AVX2 10; STRICT 0x10000
_MKL_AUTO_STRICT, _MKL_COMPATIBLE_STRICT, _MKL_AVX2_STRICT = 0x10002, 0x10003, 0x1000A
_MKL_CBWR_ALL = -1


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` on /proc/cpuinfo's first processor (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith(field)), None)
    except OSError:
        return None


def expected_mkl_branch(m: str) -> int:
    """The MKL CNR branch pinned mode ``m`` gets on this CPU: MKL serves AVX2 on Intel CPUs only and
    answers a request for it with its AUTO branch (strict) on the others."""
    if m == "portable":
        return _MKL_COMPATIBLE_STRICT
    return _MKL_AVX2_STRICT if _cpuinfo("vendor_id") == "GenuineIntel" else _MKL_AUTO_STRICT


def mode() -> str:
    """The requested mode (``QALORA_NUMERICS``, default deterministic); a bad value names what is valid."""
    value = os.environ.get(MODE_ENV, DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r} is not a numeric mode; valid: {', '.join(MODES)}")
    return value


def pin() -> str:
    """Set the environment of the requested mode for this process and its children; returns the mode.

    The deterministic and portable modes override values the user set for the pinned variables (their
    point is that the machine and its environment do not change the bytes); native mode leaves
    everything as it is.
    Call before torch runs anything; :func:`activate` verifies.
    """
    m = mode()
    os.environ[MODE_ENV] = m
    os.environ.update(MODE_ENV_VALUES.get(m, {}))
    return m


def mkl_branch() -> int | None:
    """MKL's active CNR branch (``mkl_cbwr_get(MKL_CBWR_ALL)``), or None where torch has no MKL."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(get(_MKL_CBWR_ALL))


def activate() -> dict[str, Any]:
    """Check the requested mode is in effect in this process and switch on its runtime parts.

    Raises RuntimeError in a pinned mode when torch was initialised before :func:`pin` (the CPU
    capability or MKL branch is not the pinned one), naming what differs and how to fix it.
    Returns :func:`describe`.
    """
    import torch

    m = mode()
    if m in MODE_ENV_VALUES:
        problems = []
        cap = torch.backends.cpu.get_cpu_capability()
        if cap != _ATEN_EXPECTED:
            problems.append(f"ATen CPU capability is {cap}, not {_ATEN_EXPECTED}")
        branch, want = mkl_branch(), expected_mkl_branch(m)
        if branch is not None and branch != want:
            problems.append(f"MKL CNR branch is {branch:#x}, not {want:#x}")
        if problems:
            raise RuntimeError(
                f"{m} numerics are not in effect: " + "; ".join(problems)
                + f". torch ran before the mode was pinned: start the process with "
                + " ".join(f"{k}={v}" for k, v in MODE_ENV_VALUES[m].items())
                + f" (the qalora CLI does this), or set {MODE_ENV}=native to accept machine-dependent bytes")
        # CPU ops are deterministic run to run already; this covers the few that are not, and CUDA.
        torch.use_deterministic_algorithms(True, warn_only=True)
    return describe()


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_isa() -> list[str]:
    """The x86 extensions that decide which kernels the libraries may pick."""
    flags = (_cpuinfo("flags") or "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return [w for w in wanted if w in flags]


def gpu_facts() -> dict[str, Any] | None:
    """GPU model, driver, CUDA runtime and cuDNN of this process (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    facts: dict[str, Any] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                             "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    try:
        import subprocess

        facts["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        facts["driver"] = None
    return facts


def describe() -> dict[str, Any]:
    """What decided this process's numerics: recorded in every manifest and in the MLflow lineage.

    ``key`` is what must be equal for two processes to produce the same bytes from the same inputs:
    in portable mode it does not depend on the machine; in deterministic mode it does on the CPU's
    vendor (MKL's branch), and on AMD MKL's AUTO branch may also follow the CPU model (``cpu``,
    ``cpu_isa`` tell); in native mode it is the CPU's path.
    """
    import torch

    facts = _paths() | {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_isa": _cpu_isa(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "gpu": gpu_facts(),
    }
    facts["key"] = key()
    return facts


def _paths() -> dict[str, Any]:
    import torch

    branch = mkl_branch()
    return {"mode": mode(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": None if branch is None else f"{branch:#x}",
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def key() -> str:
    """The code paths that decide the bytes, e.g. ``deterministic:AVX2:0x1000a:AVX2`` (Intel; 0x10002 on
    AMD, where MKL serves no AVX2 branch): part of every
    stage cache key, so artifacts built under another mode or path are not reused as if equal."""
    return ":".join(str(v) for v in _paths().values())


# Facts that explain a difference in bytes, in the order a reader should look at them.
EXPLAINING = ("mode", "cpu_capability", "mkl_cbwr", "onednn_max_cpu_isa", "torch", "gpu", "cpu", "cpu_isa", "threads")


def explain(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Lines naming each numeric fact that differs between a recorded :func:`describe` and this one."""
    lines = []
    for k in EXPLAINING:
        if recorded.get(k) != here.get(k):
            lines.append(f"numerics.{k}: recorded {recorded.get(k)!r}, here {here.get(k)!r}")
    return lines
