"""How many intra-op threads training and inference use: an explicit choice when there is one, else the CPUs free now.

Why this exists: torch starts one intra-op thread per physical core, and its OpenMP threads spin while they wait
for each other. When other processes already keep those cores busy, every parallel region waits for the thread
that lost its core, and a run can be several times slower than with one thread (3 digits epochs with two other
CPU-bound processes on 2 cores: 38 s with torch's 2 threads, 18 s with 1; see benchmarks/RESULTS.md).

Precedence (the first that applies decides, and `ThreadChoice.reason` says which):

1. the `threads` setting (TrainConfig, `--threads N`, `threads=` of evaluate/predict) when it is a number;
2. an earlier `torch.set_num_threads(n)` in this process: the current count differs both from torch's start-up
   default (OMP_NUM_THREADS / MKL_NUM_THREADS, else the CPU count) and from what vitkit set last. A count equal
   to the default cannot be told apart from it: to force that count, use the setting or the environment;
3. OMP_NUM_THREADS / MKL_NUM_THREADS in the environment (MKL_NUM_THREADS wins when both are set, as in torch);
4. the count a resumed run recorded, so that it continues bit-exactly (float reductions depend on the count);
5. auto: the CPUs this process may use (affinity, cgroup quota, at most torch's default) that were idle over a
   short window (~0.2 s of /proc/stat), rounded, at least 1. On an idle machine that is torch's own default.

The count is chosen once at the start (of a run, an evaluation, a prediction); load that starts later is not seen.
This module is bottom-level: it imports only the standard library and torch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ThreadSetting = int | Literal["auto"]
Source = Literal["setting", "torch", "env", "recorded", "auto"]
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch at start-up; the later one wins there

_applied: int | None = None  # the count vitkit itself set last: not a user's choice when seen again


@dataclass(frozen=True)
class Availability:
    """What the machine offers right now."""

    cpus: int  # CPUs this process may run on (its affinity mask)
    cap: int  # most threads worth using: min(cpus, cgroup quota, physical cores = torch's default count)
    free: float | None  # CPUs' worth of idle time on those CPUs in the sample window (0 .. cpus); None: not measured


@dataclass(frozen=True)
class ThreadChoice:
    """A decided intra-op thread count, where it came from and why."""

    count: int  # intra-op threads (torch.set_num_threads)
    source: Source  # which rule decided (see the module docstring)
    reason: str  # one human-readable clause, e.g. "auto: 0.1 of 2 CPUs idle (others busy)"

    def line(self) -> str:
        """The one log line a run prints: `threads: 1 (auto: 0.1 of 2 CPUs idle, others busy)`."""
        return f"threads: {self.count} ({self.reason})"

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def check_threads(value: object, name: str = "threads") -> ThreadSetting:
    """Validate a `threads` setting: "auto" or a positive integer (returned unchanged).

    Raises:
        ValueError: anything else, naming the value.
    """
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value  # type: ignore[return-value]
    raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")


def parse_threads(text: str) -> ThreadSetting:
    """A command-line `--threads` value: "auto" or a positive integer written in digits.

    Raises:
        ValueError: anything else, naming the text.
    """
    text = text.strip()
    return check_threads(int(text) if text.isdigit() else text, "--threads")


def env_threads(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(variable, count) from OMP_NUM_THREADS / MKL_NUM_THREADS, or None when neither is set.

    OMP_NUM_THREADS may be a nesting list ("4,2"); its first entry is the intra-op count.

    Raises:
        ValueError: a set variable that is not a positive integer (torch would only warn and ignore it).
    """
    environ = os.environ if environ is None else environ
    found = None
    for var in ENV_VARS:
        raw = environ.get(var)
        if raw is None or not raw.strip():
            continue
        first = raw.split(",")[0].strip()
        if not first.isdigit() or int(first) == 0:
            raise ValueError(
                f"{var}={raw!r} is not a positive integer; set it to a thread count such as 1, or unset it"
            )
        found = (var, int(first))  # later variables win, as in torch's intraop_default_num_threads
    return found


def physical_cores() -> int:
    """Physical cores of the machine (distinct physical id / core id pairs in /proc/cpuinfo), else the CPU count.

    This is the count torch starts with when no environment variable says otherwise (cpuinfo's cores).
    """
    try:
        with open("/proc/cpuinfo") as f:
            return _count_cores(f.read(), os.cpu_count() or 1)
    except OSError:
        return os.cpu_count() or 1


def _count_cores(cpuinfo: str, logical: int) -> int:
    cores, phys = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return max(1, min(len(cores), logical)) if cores else logical


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cgroup_cpus() -> int | None:
    """The CPU quota of this process's cgroup (v2 cpu.max or v1 cfs quota), rounded up; None when unlimited."""
    for path, period_path in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(path) as f:
                text = f.read()
            if period_path is not None:
                with open(period_path) as f:
                    text += " " + f.read()
        except OSError:
            continue
        return _quota_cpus(text)
    return None


def _quota_cpus(text: str) -> int | None:
    """CPUs of a "QUOTA PERIOD" pair (cgroup v2 cpu.max; v1 joined the same way), rounded up; None = no limit."""
    parts = text.split()
    try:
        quota, period = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # "max 100000": no limit
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) clock ticks summed over `cpus` from /proc/stat; None where /proc/stat is unreadable."""
    try:
        with open("/proc/stat") as f:
            return _parse_cpu_times(f.read(), cpus)
    except OSError:
        return None


def _parse_cpu_times(stat: str, cpus: set[int]) -> tuple[float, float]:
    idle = total = 0.0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user): stolen time is busy
        v = [float(x) for x in rest.split()[:8]]
        idle += v[3] + v[4]
        total += sum(v)
    return idle, total


def measure_availability(window_s: float = 0.2) -> Availability:
    """Sample how many of this process's CPUs are idle over `window_s` seconds (skipped when the cap is 1).

    Our own CPU time in the window (e.g. OpenMP threads still spinning after earlier work) counts as free, since
    it is ours to reassign. Without /proc/stat (not Linux) nothing is measured and auto means the cap.
    """
    cpus = _affinity()
    quota = _cgroup_cpus()
    cap = max(1, min(len(cpus), quota or len(cpus), physical_cores()))
    before, own0, t0 = _cpu_times(cpus), time.process_time(), time.monotonic()
    if before is None or cap == 1:
        return Availability(cpus=len(cpus), cap=cap, free=None)
    time.sleep(window_s)
    after, own1, t1 = _cpu_times(cpus), time.process_time(), time.monotonic()
    if after is None or after[1] <= before[1]:
        return Availability(cpus=len(cpus), cap=cap, free=None)
    idle_share = (after[0] - before[0]) / (after[1] - before[1])  # of all the allowed CPUs' time
    own = (own1 - own0) / max(t1 - t0, 1e-9)  # CPUs' worth of our own time
    return Availability(cpus=len(cpus), cap=cap, free=min(float(len(cpus)), idle_share * len(cpus) + own))


def auto_threads(avail: Availability) -> int:
    """Idle CPUs rounded to the nearest whole one (half up), between 1 and the cap (the cap when not measured)."""
    if avail.free is None:
        return avail.cap
    return max(1, min(avail.cap, math.floor(avail.free + 0.5)))


def _torch_defaults(env: tuple[str, int] | None) -> set[int]:
    """Counts torch may have started with: the environment's, else the physical cores or the logical CPUs."""
    if env is not None:
        return {env[1]}
    return {physical_cores(), os.cpu_count() or 1}


def _explicit_choice(
    setting: ThreadSetting, env: tuple[str, int] | None, current: int, applied: int | None
) -> ThreadChoice | None:
    """Rules 1-3: the setting, an earlier torch.set_num_threads, the environment; None when none applies."""
    if setting != "auto":
        return ThreadChoice(setting, "setting", f"threads setting {setting}")
    if current != applied and current not in _torch_defaults(env):
        return ThreadChoice(current, "torch", f"torch.set_num_threads({current}) called before; kept")
    if env is not None:
        return ThreadChoice(env[1], "env", f"{env[0]}={env[1]}")
    return None


def choose_threads(
    setting: ThreadSetting | None = "auto",
    *,
    recorded: int | None = None,
    environ: Mapping[str, str] | None = None,
    current: int | None = None,
    applied: int | None = None,
    availability: Availability | Callable[[], Availability] | None = None,
) -> ThreadChoice:
    """Decide the intra-op thread count (see the module docstring for the rules); changes nothing.

    Args:
        setting: "auto" (or None) to decide, or a positive integer to use as given.
        recorded: the count a resumed run used, kept unless something explicit overrides it.
        environ: environment to read OMP_NUM_THREADS / MKL_NUM_THREADS from (default os.environ).
        current: torch's current count (default torch.get_num_threads()).
        applied: the count vitkit set last in this process (default: remembered by `set_threads`).
        availability: the machine's state, or a function measuring it (default `measure_availability`); only
            measured when the auto rule is reached.

    Raises:
        ValueError: a bad setting, recorded count or environment variable, naming the value.
    """
    setting = "auto" if setting is None else check_threads(setting)
    if recorded is not None and (isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1):
        raise ValueError(f"the recorded thread count must be a positive integer, got {recorded!r}")
    env = env_threads(environ)
    current = torch.get_num_threads() if current is None else current
    applied = _applied if applied is None else applied
    explicit = _explicit_choice(setting, env, current, applied)
    if explicit is not None:
        if recorded is not None and recorded != explicit.count:
            note = f"; the run recorded {recorded}, so it will not continue bit-exactly"
            explicit = ThreadChoice(explicit.count, explicit.source, explicit.reason + note)
        return explicit
    if recorded is not None:
        return ThreadChoice(recorded, "recorded", "the count this run recorded, so it resumes bit-exactly")
    if availability is None:
        availability = measure_availability
    avail = availability() if callable(availability) else availability
    count = auto_threads(avail)
    idle = "load not measured" if avail.free is None else f"{avail.free:.1f} of {avail.cpus} CPUs idle"
    capped = f", at most {avail.cap} (cgroup quota or physical cores)" if avail.cap < avail.cpus else ""
    return ThreadChoice(count, "auto", f"auto: {idle}{capped}")


def set_threads(
    setting: ThreadSetting | None = "auto",
    *,
    recorded: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ThreadChoice:
    """Choose the intra-op thread count (`choose_threads`), apply it with torch.set_num_threads and log one line.

    The count applies to the whole process, as torch.set_num_threads does.

    Args:
        setting: "auto" (or None) or a positive integer.
        recorded: the count a resumed run recorded (used when nothing explicit overrides it).
        log: receives `ThreadChoice.line()`; None says nothing.

    Returns:
        The choice (count, source, reason) to record alongside the results.
    """
    global _applied
    choice = choose_threads(setting, recorded=recorded)
    if torch.get_num_threads() != choice.count:
        torch.set_num_threads(choice.count)
    if choice.source != "torch":  # the user's own count stays theirs on the next call
        _applied = choice.count
    if log is not None:
        log(choice.line())
    return choice
