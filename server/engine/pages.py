"""Give back the resident pages of weights that were copied elsewhere and are never read
again, when they are a read-only view of a file (the safetensors mmap HF loads into).

Packing q/k/v and gate/up (``packed.py``) copies those weights into new tensors. The
originals stay mapped: safetensors maps the whole file and every tensor of it keeps the
mapping alive, so the pages the copy touched stayed in the process's RSS (+254 MB on
Gemma 3 270M fp32, measured). ``madvise(MADV_DONTNEED)`` drops them from the process. On
a private file mapping whose pages still hold the file's bytes that is transparent: a
later read faults the same bytes back in. So it is done only where the mapping is a file's
and, if writable (HF maps ``rw-p``), the tensor was never written in place (torch's
version counter is 0). Anything else (anonymous memory, a shared mapping, a modified
tensor) is left alone, since there DONTNEED would zero or discard data.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os

import torch

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux


def _file_mapping(address: int) -> tuple[int, int, bool] | None:
    """``(start, end, writable)`` of the file-backed mapping holding ``address``, else None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    perms, path = fields[1], fields[5] if len(fields) > 5 else ""
                    return (lo, hi, "w" in perms) if path.startswith("/") and "s" not in perms else None
    except OSError:  # not Linux
        return None
    return None


def release(tensors: list[torch.Tensor]) -> int:
    """Drop the resident pages wholly inside each CPU tensor's bytes if they lie in a
    private file mapping and still hold the file's bytes; returns the bytes released (0
    where nothing qualified)."""
    libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        span = _file_mapping(begin)
        if span is None or end > span[1] or (span[2] and t._version):
            continue  # not a file's bytes, or written since it was loaded (DONTNEED would undo that)
        lo, hi = -(-begin // page) * page, end // page * page  # whole pages inside the tensor only
        if hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            released += hi - lo
    return released
