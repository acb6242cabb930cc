"""This process's GPU memory as the driver counts it (NVML), CUDA context included.

torch's allocator counts only its own blocks; a user reading nvidia-smi sees the process's whole
figure: the CUDA context, the cuBLAS / cuSOLVER workspaces and the allocator's reserved blocks. NVML
(libnvidia-ml, installed with every NVIDIA driver) reports that figure per process; it is read here
through ctypes, so no Python package is needed. Where NVML cannot say (no driver library, a
container whose PID namespace hides the process from the driver, another vendor's GPU), the
figure is None and callers count torch's reserved memory alone, and say so.
"""

from __future__ import annotations

import ctypes
import os


class _ProcessInfo(ctypes.Structure):
    # nvmlProcessInfo_t (v2 and later): pid, usedGpuMemory, gpuInstanceId, computeInstanceId.
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong), ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


_NVML: ctypes.CDLL | None = None
_NVML_TRIED = False


def _nvml() -> ctypes.CDLL | None:
    global _NVML, _NVML_TRIED
    if not _NVML_TRIED:
        _NVML_TRIED = True
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() == 0:
                _NVML = lib
        except (OSError, AttributeError):
            _NVML = None
    return _NVML


def process_gpu_bytes(uuid: str, pid: int | None = None) -> int | None:
    """GPU memory the driver counts for process `pid` (this one by default) on the device with this
    UUID ("GPU-..."), or None where NVML cannot tell."""
    lib = _nvml()
    if lib is None:
        return None
    pid = os.getpid() if pid is None else pid
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
        return None
    for name in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        count = ctypes.c_uint(64)
        infos = (_ProcessInfo * 64)()
        if fn(handle, ctypes.byref(count), infos) != 0:
            return None
        for info in infos[: count.value]:
            if info.pid == pid and info.usedGpuMemory < (1 << 62):  # NVML_VALUE_NOT_AVAILABLE is ~0
                return int(info.usedGpuMemory)
        return None
    return None
