"""A psutil snapshot of the machine a worker runs on, and of the worker process itself."""

from __future__ import annotations

import os
import socket
import time
from typing import TypedDict

import psutil

__all__ = ["HostSample", "snapshot"]

SAMPLE_VERSION = 1


class CpuSample(TypedDict):
    percent: float
    per_core: list[float]
    count: int


class MemorySample(TypedDict):
    total: int
    available: int
    used: int
    percent: float


class SwapSample(TypedDict):
    total: int
    used: int
    percent: float


class DiskSample(TypedDict):
    path: str
    total: int
    used: int
    free: int
    percent: float
    read_bytes: int | None
    write_bytes: int | None
    read_count: int | None
    write_count: int | None


class NetSample(TypedDict):
    bytes_sent: int
    bytes_recv: int
    packets_sent: int
    packets_recv: int
    errin: int
    errout: int
    dropin: int
    dropout: int


class ProcessSample(TypedDict):
    pid: int
    rss: int
    vms: int
    threads: int
    open_files: int
    cpu_user: float
    cpu_system: float


class HostSample(TypedDict):
    v: int
    host: str
    taken_at: float
    cpu: CpuSample
    load_avg: list[float]
    memory: MemorySample
    swap: SwapSample
    disk: DiskSample
    net: NetSample
    process: ProcessSample


_primed_pid: int | None = None


def _cpu_per_core() -> list[float]:
    global _primed_pid
    # psutil measures CPU use between two calls. The first call in a process has no earlier
    # point, so it measures a short window instead of answering 0.0 (and after a fork the
    # parent's point is meaningless for the child).
    if _primed_pid != os.getpid():
        _primed_pid = os.getpid()
        return list(psutil.cpu_percent(interval=0.1, percpu=True))
    return list(psutil.cpu_percent(interval=None, percpu=True))


def snapshot(*, disk_path: str = "/") -> HostSample:
    """Take one sample of the host (CPU, memory, swap, disk, network, load) and this process.

    Costs well under 5 ms of CPU after the first call in a process (the first one waits 0.1 s
    to measure CPU use). Disk I/O counters are ``None`` where the kernel does not expose them
    (some containers).
    """
    per_core = _cpu_per_core()
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    du = psutil.disk_usage(disk_path)
    dio = psutil.disk_io_counters()
    net = psutil.net_io_counters()
    proc = psutil.Process()
    with proc.oneshot():
        mem = proc.memory_info()
        cpu_times = proc.cpu_times()
        threads = proc.num_threads()
        fds = proc.num_fds() if hasattr(proc, "num_fds") else len(proc.open_files())
    return {
        "v": SAMPLE_VERSION,
        "host": socket.gethostname(),
        "taken_at": time.time(),
        "cpu": {
            "percent": round(sum(per_core) / len(per_core), 2) if per_core else 0.0,
            "per_core": per_core,
            "count": psutil.cpu_count() or len(per_core),
        },
        "load_avg": [round(x, 3) for x in os.getloadavg()],
        "memory": {"total": vm.total, "available": vm.available, "used": vm.used,
                   "percent": vm.percent},
        "swap": {"total": sw.total, "used": sw.used, "percent": sw.percent},
        "disk": {
            "path": disk_path,
            "total": du.total,
            "used": du.used,
            "free": du.free,
            "percent": du.percent,
            "read_bytes": dio.read_bytes if dio else None,
            "write_bytes": dio.write_bytes if dio else None,
            "read_count": dio.read_count if dio else None,
            "write_count": dio.write_count if dio else None,
        },
        "net": {
            "bytes_sent": net.bytes_sent,
            "bytes_recv": net.bytes_recv,
            "packets_sent": net.packets_sent,
            "packets_recv": net.packets_recv,
            "errin": net.errin,
            "errout": net.errout,
            "dropin": net.dropin,
            "dropout": net.dropout,
        },
        "process": {
            "pid": proc.pid,
            "rss": mem.rss,
            "vms": mem.vms,
            "threads": threads,
            "open_files": fds,
            "cpu_user": cpu_times.user,
            "cpu_system": cpu_times.system,
        },
    }
