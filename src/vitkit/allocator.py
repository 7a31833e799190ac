"""The C memory allocator on CPU: keep freed memory in the process, so that each forward does not pay page faults.

Why this exists: with glibc's defaults, an allocation above the mmap threshold (128 KiB at start, raised as large
blocks are freed, up to 32 MiB) gets fresh pages from the OS, and freed memory at the top of the heap above the
trim threshold goes back to the OS. A ViT forward allocates activations of several MiB in every layer, so on CPU
every forward maps pages again and the kernel zeroes them. Keeping freed memory in the process made CPU inference
1.03x-1.47x faster in one run and 1.25x-2.20x in another on a 2-core EPYC, and a training step 1.5x-1.7x; token
merging (whose blocks each allocate a new size) gains more (benchmarks/RESULTS.md, "The memory allocator on CPU"). The settings are the same as
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=...`` at process start, applied
at run time through ``mallopt(3)``; both were measured in one run (same speed within the noise).

The cost: the process keeps its peak memory until it exits (and so does each forked DataLoader worker).
`vitkit compare`'s CPU memory measurement (`vitkit.compare.measure.PeakMemory`) returns freed memory to the OS and
sets a 64 KiB mmap threshold while it measures, so memory freed before is not reused silently, whichever setting
is in force; afterwards it sets the threshold to 32 MiB (the value here, and where glibc's dynamic threshold
settles).

The command-line tool applies `keep_freed_memory` at start unless ``VITKIT_MALLOC=system`` (see `apply_env`); the
library never changes the allocator by itself: a Python program calls `keep_freed_memory()` if it wants it.
Linux with glibc only; elsewhere (musl, macOS, Windows) nothing changes and the functions say so.
This module is bottom-level: it imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Literal

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB of free heap before any goes back to the OS

ENV_VAR = "VITKIT_MALLOC"
MallocSetting = Literal["keep", "system"]
SETTINGS: tuple[str, ...] = ("keep", "system")


def glibc() -> ctypes.CDLL | None:
    """glibc's C library with its malloc controls (`mallopt`, `malloc_trim`), or None where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (an AttributeError here means no glibc malloc)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(libc: ctypes.CDLL | None = None) -> bool:
    """Make glibc's malloc serve allocations up to 32 MiB from the heap and keep freed heap memory (up to 2 GiB
    free) in the process instead of returning it to the OS. Process-wide; lasts until the process exits or
    `mallopt` is called again. Threads share it and forked processes (DataLoader workers with the fork start
    method) inherit it; spawned processes start with glibc's defaults.

    Args:
        libc: The C library to configure; None = this process's (`glibc()`). For tests.

    Returns:
        True when both settings were applied. False where there is no glibc or mallopt refused the mmap threshold
        (then nothing changed), or refused the trim threshold (then only the mmap threshold changed).
    """
    libc = glibc() if libc is None else libc
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def env_setting(environ: Mapping[str, str] | None = None) -> MallocSetting:
    """The allocator setting asked for by ``VITKIT_MALLOC``: "keep" (the default when unset or empty) or "system"
    (glibc's defaults, untouched).

    Raises:
        ValueError: Any other value, named, with the allowed ones.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR, "").strip().lower() or "keep"
    if value not in SETTINGS:
        raise ValueError(f"{ENV_VAR}={environ[ENV_VAR]!r} is not a setting: use one of {', '.join(SETTINGS)}")
    return value  # type: ignore[return-value]


def apply_env(environ: Mapping[str, str] | None = None, libc: ctypes.CDLL | None = None) -> bool:
    """What the command-line tool does at start: `keep_freed_memory` unless ``VITKIT_MALLOC=system``.

    Returns:
        True when the allocator was changed.

    Raises:
        ValueError: A bad ``VITKIT_MALLOC`` value (see `env_setting`).
    """
    if env_setting(environ) == "system":
        return False
    return keep_freed_memory(libc)
