"""Thread count on an idle and on a busy machine: `vitkit train`'s default (threads: auto) against fixed counts.

What it runs, in one go:
1. the machine: CPU model (lscpu), CPUs, torch version, load average; the fp32 matmul rate (GFLOP/s of a 1024^3
   product, best of several, in a fresh process) at 1 thread and at torch's default count;
2. idle: the default run (`vitkit train --epochs E`, the digits recipe) and the same with OMP_NUM_THREADS=1, =2;
3. busy: the same three with N CPU-bound background processes (`while True: pass`) that this script starts and
   always kills (also on Ctrl-C / SIGTERM); the matmul rate is measured again under that load.

Each run is a fresh `python -m vitkit train --epochs E --no-progress --out TMP` process, as a user starts it; the
configurations take turns within each repeat so that slow drifts of the machine hit them alike. Reported per
configuration: the median process wall time (import, data, training, test) and training time (summary.json's
train_time_s), and the thread count the run chose. The last lines give default / best fixed count per phase
(goal: <= 1.2 when busy, ~1.0 when idle).

Usage:
    python benchmarks/threads.py                        # 3 epochs, 3 repeats, 2 busy processes (~6 min on 2 cores)
    python benchmarks/threads.py --epochs 1 --repeats 1 # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # label -> environment changes; "default" sets nothing, so vitkit decides (threads: auto)
    "default (auto)": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"},
}
MATMUL = """
import json, sys, time, torch
n = 1024
if int(sys.argv[1]): torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
best = float("inf")
for _ in range(5):
    t = time.perf_counter(); reps = 0
    while time.perf_counter() - t < 0.2:
        a @ b; reps += 1
    best = min(best, (time.perf_counter() - t) / reps)
print(json.dumps({"threads": torch.get_num_threads(), "gflops": 2 * n**3 / best / 1e9}))
"""


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return {**env, **extra}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def matmul_gflops(threads: int) -> dict:
    """fp32 1024^3 matmul rate in a fresh process; threads 0 = torch's default count."""
    out = subprocess.run(
        [sys.executable, "-c", MATMUL, str(threads)], env=_clean_env({}), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def train_once(epochs: int, env_extra: dict[str, str], workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    cmd = [sys.executable, "-m", "vitkit", "train", "--epochs", str(epochs), "--no-progress", "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_clean_env(env_extra), capture_output=True, text=True, cwd=workdir)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("threads: ")), "")
    return {"wall_s": wall, "train_s": summary["train_time_s"], "threads": summary["threads"]["count"], "line": line}


class BusyProcesses:
    """N CPU-bound Python processes, started on entry and killed on exit, whatever ends the block."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> BusyProcesses:
        code = "while True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(1.0)  # let them reach full speed and the scheduler settle
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def run_phase(name: str, epochs: int, repeats: int, workdir: Path, log, results: dict[str, list[dict]]) -> None:
    """Fill `results` (label -> runs) as the runs finish, so an interrupted benchmark still reports them."""
    results.update({label: [] for label in CONFIGS})
    labels = list(CONFIGS)
    for rep in range(repeats):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]  # rotate who goes first
        for label in order:
            r = train_once(epochs, CONFIGS[label], workdir)
            results[label].append(r)
            where = f"[{name} {rep + 1}/{repeats}] {label}"
            log(f"{where}: {r['wall_s']:.1f} s wall, {r['train_s']:.1f} s train, {r['line']}")


def table(phases: dict[str, dict[str, list[dict]]]) -> list[str]:
    rows = [
        "| load | threads setting | chose | wall s (median) | wall s (all runs) | train s (median) | vs best fixed |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    ratios = {}
    for phase, results in phases.items():
        results = {label: rs for label, rs in results.items() if rs}
        med = {label: statistics.median(r["wall_s"] for r in rs) for label, rs in results.items()}
        fixed = [v for label, v in med.items() if label != "default (auto)"]
        if not fixed or "default (auto)" not in med:
            continue
        best_fixed = min(fixed)
        for label, rs in results.items():
            chose = "/".join(str(c) for c in sorted({r["threads"] for r in rs}))
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
            train = statistics.median(r["train_s"] for r in rs)
            rows.append(
                f"| {phase} | {label} | {chose} | {med[label]:.1f} | {walls} | {train:.1f} | "
                f"{med[label] / best_fixed:.2f}x |"
            )
        ratios[phase] = med["default (auto)"] / best_fixed
    rows.append("")
    for phase, ratio in ratios.items():
        rows.append(f"- {phase}: default / best fixed count = {ratio:.2f}x (median wall time)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the digits default per run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration and phase (default 3)")
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound background processes when busy (default 2)")
    args = parser.parse_args()
    if args.epochs < 1 or args.repeats < 1 or args.busy < 1:
        raise SystemExit(f"--epochs, --repeats and --busy must be >= 1, got {args.epochs}, {args.repeats}, {args.busy}")

    # SIGTERM ends the script through the same `finally`/`__exit__` path as Ctrl-C, so no busy process outlives it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    t_start = time.perf_counter()
    header = [
        f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; "
        f"torch {torch.__version__} (default {torch.get_num_threads()} threads); Python {sys.version.split()[0]}",
        f"load average before: {loadavg()}",
    ]
    mm = {"idle": [matmul_gflops(1), matmul_gflops(0)]}
    phases: dict[str, dict[str, list[dict]]] = {"idle": {}}
    busy = f"busy ({args.busy} CPU-bound processes)"
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="vitkit-threads-") as tmp:
            workdir = Path(tmp)
            run_phase("idle", args.epochs, args.repeats, workdir, log, phases["idle"])
            with BusyProcesses(args.busy):
                mm[busy] = [matmul_gflops(1), matmul_gflops(0)]
                phases[busy] = {}
                run_phase("busy", args.epochs, args.repeats, workdir, log, phases[busy])
    except (KeyboardInterrupt, SystemExit):  # report what finished; the busy processes are gone already
        interrupted = True
    header.append(f"load average after: {loadavg()}")
    print(f"\n## Thread count on an idle and a busy machine (`benchmarks/threads.py --epochs {args.epochs} "
          f"--repeats {args.repeats} --busy {args.busy}`)\n")  # fmt: skip
    print("\n".join(f"- {line}" for line in header))
    for phase, (one, default) in mm.items():
        print(
            f"- fp32 matmul 1024^3, {phase}: {one['gflops']:.1f} GFLOP/s at 1 thread, "
            f"{default['gflops']:.1f} GFLOP/s at {default['threads']} threads"
        )
    print(
        f"- {args.epochs} epochs of the digits default (`vitkit train --epochs {args.epochs}`), a fresh process each\n"
    )
    print("\n".join(table(phases)))
    print(f"\n(whole benchmark: {time.perf_counter() - t_start:.0f} s)")
    if interrupted:
        print("INTERRUPTED: the table holds only the runs that finished")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
