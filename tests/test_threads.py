"""vitkit.threads: the decision on simulated machines, its precedence, validation, and that runs record it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import vitkit
from vitkit import threads
from vitkit.threads import Availability, ThreadChoice, choose_threads, set_threads

IDLE_2 = Availability(cpus=2, cap=2, free=1.97)
BUSY_2 = Availability(cpus=2, cap=2, free=0.02)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """No thread variables from the caller's environment, torch's count and vitkit's memory restored after."""
    for var in threads.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before, applied = torch.get_num_threads(), threads._applied
    yield
    torch.set_num_threads(before)
    threads._applied = applied


def _unmeasurable():
    raise AssertionError("the machine was measured although an explicit choice decides")


# --- the auto rule on simulated machines -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("avail", "expected"),
    [
        (Availability(cpus=2, cap=2, free=2.0), 2),  # idle 2-core machine: torch's own default
        (Availability(cpus=2, cap=2, free=0.0), 1),  # two CPU-bound neighbours: one thread, never zero
        (Availability(cpus=2, cap=2, free=1.0), 1),  # one neighbour: the free core only
        (Availability(cpus=8, cap=8, free=5.4), 5),
        (Availability(cpus=8, cap=8, free=5.5), 6),  # half up
        (Availability(cpus=64, cap=4, free=60.0), 4),  # a cgroup quota or physical cores cap it
        (Availability(cpus=4, cap=4, free=None), 4),  # not measurable (no /proc/stat): the cap
    ],
)
def test_auto_threads_from_idle_cpus(avail, expected):
    choice = choose_threads("auto", environ={}, current=2, applied=2, availability=avail)
    assert (choice.count, choice.source) == (expected, "auto")


def test_auto_reason_names_the_measurement():
    assert choose_threads(environ={}, current=2, applied=2, availability=BUSY_2).line() == (
        "threads: 1 (auto: 0.0 of 2 CPUs idle)"
    )
    capped = choose_threads(environ={}, current=2, applied=2, availability=Availability(cpus=8, cap=2, free=7.0))
    assert capped.reason == "auto: 7.0 of 8 CPUs idle, at most 2 (cgroup quota or physical cores)"


def test_measure_availability_on_simulated_proc_stat(monkeypatch):
    # Two readings of /proc/stat 0.2 s apart (100 ticks/s): cpu0 was idle 15 of 20 ticks, cpu1 5 of 20 (iowait
    # counts as idle, steal as busy); cpu2 is outside the affinity mask and must be ignored.
    stats = iter(
        [
            "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 500 0 0 0 0 0 0\ncpu1 100 0 0 500 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
            "cpu  0 0 0 0 0 0 0 0\ncpu0 105 0 0 512 3 0 0 0 0 0\ncpu1 110 0 0 505 0 0 0 5\ncpu2 0 0 0 99 0 0 0 0\n",
        ]
    )
    clock = iter([10.0, 10.2])
    own = iter([1.0, 1.05])  # 0.05 s of our own CPU time in 0.2 s: a quarter CPU, ours to reassign

    class FakeTime:
        sleep = staticmethod(lambda s: None)
        monotonic = staticmethod(lambda: next(clock))
        process_time = staticmethod(lambda: next(own))

    monkeypatch.setattr(threads, "time", FakeTime)
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: threads._parse_cpu_times(next(stats), cpus))
    avail = threads.measure_availability()
    assert (avail.cpus, avail.cap) == (2, 2)
    assert avail.free == pytest.approx(20 / 40 * 2 + 0.25)
    assert threads.auto_threads(avail) == 1


def test_quota_and_core_parsing():
    assert threads._quota_cpus("max 100000\n") is None
    assert threads._quota_cpus("150000 100000\n") == 2
    assert threads._quota_cpus("50000 100000") == 1
    assert threads._quota_cpus("-1 100000") is None  # cgroup v1's "no limit"
    smt = "".join(f"processor : {i}\nphysical id : 0\ncore id : {i // 2}\n\n" for i in range(4))
    assert threads._count_cores(smt, 4) == 2  # 4 hyper-threads on 2 cores: torch starts 2 threads
    assert threads._count_cores("processor : 0\n", 3) == 3  # no topology: the logical count


# --- precedence ----------------------------------------------------------------------------------------------
def test_setting_beats_everything():
    choice = choose_threads(
        3, recorded=1, environ={"OMP_NUM_THREADS": "1"}, current=5, applied=None, availability=_unmeasurable
    )
    assert (choice.count, choice.source) == (3, "setting")
    assert choice.reason == "threads setting 3; the run recorded 1, so it will not continue bit-exactly"


def test_earlier_torch_set_num_threads_is_kept(monkeypatch):
    monkeypatch.setattr(threads, "_torch_defaults", lambda env: {env[1]} if env else {4})
    # 3 is not torch's start-up count (4 here) and vitkit did not set it: the user did.
    choice = choose_threads(recorded=2, environ={"OMP_NUM_THREADS": "4"}, current=3, availability=_unmeasurable)
    assert (choice.count, choice.source) == (3, "torch")
    # The start-up count itself is not a choice, nor is the count vitkit set last.
    assert choose_threads(environ={}, current=4, applied=None, availability=BUSY_2).source == "auto"
    assert choose_threads(environ={}, current=1, applied=1, availability=IDLE_2).count == 2


def test_environment_variables(monkeypatch):
    monkeypatch.setattr(threads, "_torch_defaults", lambda env: {env[1]} if env else {2})

    def pick(environ, current=1, recorded=None):
        return choose_threads(
            environ=environ, current=current, applied=1, recorded=recorded, availability=_unmeasurable
        )

    assert pick({"OMP_NUM_THREADS": "1"}) == ThreadChoice(1, "env", "OMP_NUM_THREADS=1")
    assert pick({"OMP_NUM_THREADS": "4,2"}).count == 4  # a nesting list: the first level is intra-op
    assert pick({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "3"}, current=3).reason == "MKL_NUM_THREADS=3"
    assert pick({"OMP_NUM_THREADS": "1"}, recorded=2).count == 1  # an explicit environment beats the record
    for bad in ("x", "0", "-2", "1.5"):
        with pytest.raises(ValueError, match=rf"OMP_NUM_THREADS='{bad}' is not a positive integer"):
            pick({"OMP_NUM_THREADS": bad})


def test_recorded_count_beats_auto():
    choice = choose_threads(recorded=1, environ={}, current=2, applied=2, availability=_unmeasurable)
    assert (choice.count, choice.source) == (1, "recorded")
    with pytest.raises(ValueError, match="the recorded thread count must be a positive integer, got 'auto'"):
        choose_threads(recorded="auto", environ={})
    overridden = choose_threads(2, recorded=1, environ={})
    assert overridden.reason == "threads setting 2; the run recorded 1, so it will not continue bit-exactly"


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", "many", [2]])
def test_bad_settings_are_named(bad):
    with pytest.raises(ValueError, match=re.escape(f"threads must be 'auto' or a positive integer, got {bad!r}")):
        choose_threads(bad)
    from vitkit.train import TrainConfig

    with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
        TrainConfig(threads=bad)


def test_parse_threads_for_the_command_line():
    assert threads.parse_threads("auto") == "auto" and threads.parse_threads(" 3 ") == 3
    with pytest.raises(ValueError, match="--threads must be 'auto' or a positive integer, got 0"):
        threads.parse_threads("0")
    from vitkit.cli import build_parser

    assert build_parser().parse_args(["train", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["eval", "--checkpoint", "x"]).threads == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--checkpoint", "x", "img.png", "--threads", "lots"])


def test_train_config_round_trips_threads():
    from vitkit.train import TrainConfig

    assert TrainConfig().threads == "auto"
    cfg = TrainConfig.from_dict(yaml.safe_load(TrainConfig(threads=3).to_yaml()))
    assert cfg.threads == 3


# --- applying it -------------------------------------------------------------------------------------------------
def test_set_threads_applies_logs_and_keeps_a_users_count(monkeypatch):
    monkeypatch.setattr(threads, "_torch_defaults", lambda env: {2})
    monkeypatch.setattr(threads, "measure_availability", lambda: BUSY_2)
    lines = []
    assert set_threads(log=lines.append).count == 1 and torch.get_num_threads() == 1
    assert lines == ["threads: 1 (auto: 0.0 of 2 CPUs idle)"]
    # vitkit's own 1 is not mistaken for the user's: the next call decides again (now idle: 2).
    monkeypatch.setattr(threads, "measure_availability", lambda: IDLE_2)
    assert set_threads().count == 2 and torch.get_num_threads() == 2
    # The user's own count survives this and every later call.
    torch.set_num_threads(3)
    for _ in range(2):
        assert set_threads().source == "torch" and torch.get_num_threads() == 3


# --- a run records its choice and resumes with it ------------------------------------------------------------
def test_run_says_records_and_resumes_with_its_thread_count(tmp_path, monkeypatch, capsys):
    from tests.train.conftest import TINY
    from vitkit.runs import training_record
    from vitkit.train import train

    torch.set_num_threads(1)
    monkeypatch.setattr(threads, "_torch_defaults", lambda env: {1})  # so 1 is nobody's explicit choice
    monkeypatch.setattr(threads, "measure_availability", lambda: BUSY_2)
    out, log = tmp_path / "run", []
    summary = train({**TINY, "epochs": 1, "out": str(out)}, log=log.append)
    assert "threads: 1 (auto: 0.0 of 2 CPUs idle)" in log
    assert summary["threads"] == {"count": 1, "source": "auto", "reason": "auto: 0.0 of 2 CPUs idle"}
    assert json.loads((out / "summary.json").read_text())["threads"]["count"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["threads"] == "auto"  # the request, not the result
    assert training_record(out / "last")["threads"] == 1 and training_record(out / "best")["threads"] == 1

    # The machine is idle now, so auto would say 2; the resumed run keeps the 1 it recorded.
    monkeypatch.setattr(threads, "measure_availability", lambda: IDLE_2)
    log.clear()
    resumed = train(resume=out, log=log.append)
    assert "threads: 1 (the count this run recorded, so it resumes bit-exactly)" in log
    assert resumed["threads"]["source"] == "recorded" and torch.get_num_threads() == 1
    # ... unless the user says otherwise (threads may change on resume, like workers or device).
    resumed = train(resume=out, overrides={"threads": 2}, log=log.append)
    assert resumed["threads"]["count"] == 2 and resumed["threads"]["source"] == "setting"
    assert "threads: 2 (threads setting 2; the run recorded 1, so it will not continue bit-exactly)" in log

    # eval / predict say their choice on stderr, so that --json output on stdout stays pure JSON.
    from vitkit.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "threads: 1 (threads setting 1)"
    assert json.loads(captured.out)["n"] == summary["test_images"]
    image = str(Path(vitkit.__file__).parent / "assets" / "chelsea.jpg")
    assert main(["predict", "--checkpoint", str(out), image, "--json"]) == 0  # auto on the simulated idle machine
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "threads: 2 (auto: 2.0 of 2 CPUs idle)"
    assert json.loads(captured.out)[0]["path"] == image and torch.get_num_threads() == 2
