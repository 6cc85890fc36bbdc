"""Device and dtype names, parsed in one place with errors that say what to pass instead.

A leaf module (torch and `pldr.errors` only): checkpoint loading, training, distributed
setup and the CLI all resolve "cuda" / "bfloat16" here, so they accept the same names.
"""

from __future__ import annotations

import functools
import logging

import torch

from .errors import PLDRError, PLDRTypeError

# Names `parse_dtype` accepts (lower case) and the dtypes they stand for.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# What training, benchmarks and the CLI's --dtype offer: fp16 would need a gradient scaler.
SUPPORTED_DTYPES = ("float32", "bfloat16")
# What generate, serve and bench offer for inference: also int8 weights (model/quantize.py)
INFERENCE_DTYPES = SUPPORTED_DTYPES + ("int8",)
# What inspect and extract-G offer: also float64, for deductive outputs at their exact size
ANALYSIS_DTYPES = ("float32", "float64", "bfloat16")


log = logging.getLogger("pldr")


def cpuinfo_field(name: str) -> str:
    """The value of the first `name` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset(cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD"; "" where unknown)."""
    return cpuinfo_field("vendor_id")


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16); without,
    bf16 matmuls are emulated and slower than float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def load_dtype(name: str, device: str | torch.device | None = None) -> str:
    """The float dtype to load weights in for an inference `--dtype` on `device`: int8 loads
    float32 and is quantised after loading; bfloat16 on a CPU without native bf16 falls back
    to float32 (with a warning), since it would decode slower than float32 there; the others
    load as themselves."""
    if name == "int8":
        return "float32"
    if (parse_dtype(name) == torch.bfloat16 and device is not None
            and torch.device(device).type == "cpu" and not native_bf16()):
        log.warning("this CPU has no native bfloat16 (avx512_bf16 or amx_bf16): decoding "
                    "in float32 instead, which is faster here")
        return "float32"
    return name


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch.float32 / torch.bfloat16 / ... from a dtype or a name like "bfloat16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise PLDRTypeError(f"dtype must be floating point, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise PLDRTypeError(f"unknown dtype {dtype!r}; use float32 or bfloat16")


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None, *,
                   error: type[PLDRError] = PLDRError) -> torch.device:
    """The device asked for, or with None / "auto" CUDA when present, else CPU.

    With `local_rank` (under torchrun) a bare "cuda" becomes this process's GPU,
    cuda:LOCAL_RANK; without it "cuda" stays the current GPU. An unknown name is a
    PLDRTypeError; a CUDA device on a machine without one raises `error`, so each caller
    reports it as its own kind (a CheckpointError when loading a model)."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PLDRTypeError(f"unknown device {str(device)!r}: {e}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"device {str(device)!r} is not supported by pldr; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"device {str(device)!r} is not available on this machine; use "
                        "`device='cpu'`")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"device {str(device)!r} does not exist: this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Bytes that can still be allocated on `device` and where that figure comes from, or
    None when it cannot be known. CUDA: the free memory torch.cuda.mem_get_info reports;
    CPU: /proc/meminfo's MemAvailable, or the cgroup's limit less its usage when lower
    (a container)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None
    found = None
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                found = (int(line.split()[1]) * 1024, "available RAM (MemAvailable)")
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current", encoding="ascii").read())
        if limit != "max" and (found is None or int(limit) - used < found[0]):
            found = (max(0, int(limit) - used), "left under the container's memory limit")
    except (OSError, ValueError):
        pass
    return found


__all__ = ["available_memory", "parse_dtype", "resolve_device", "load_dtype", "cpu_flags", "native_bf16",
           "DTYPES", "SUPPORTED_DTYPES",
           "INFERENCE_DTYPES", "ANALYSIS_DTYPES"]
