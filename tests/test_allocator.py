"""vitkit.allocator: the mallopt settings, the VITKIT_MALLOC switch, the CLI entry applying it, and (on glibc) that
freed memory really stays in the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vitkit import allocator, cli


class FakeLibc:
    """Records mallopt calls; answers `result` (glibc: 1 = applied, 0 = refused)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_keep_freed_memory_sets_both_thresholds():
    libc = FakeLibc()
    assert allocator.keep_freed_memory(libc) is True
    assert sorted(libc.calls) == [(-3, 32 * 2**20), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_keep_freed_memory_reports_a_refusal():
    refused = FakeLibc(result=0)
    assert allocator.keep_freed_memory(refused) is False
    assert refused.calls == [(-3, 32 * 2**20)]  # the mmap threshold was refused: the trim one is not tried


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "keep"), ("", "keep"), ("keep", "keep"), (" System ", "system")]
)
def test_env_setting(value, expected):
    environ = {} if value is None else {"VITKIT_MALLOC": value}
    assert allocator.env_setting(environ) == expected


def test_env_setting_names_a_bad_value():
    with pytest.raises(ValueError, match=r"VITKIT_MALLOC='jemalloc' is not a setting: use one of keep, system"):
        allocator.env_setting({"VITKIT_MALLOC": "jemalloc"})


def test_apply_env_system_leaves_the_allocator_alone():
    libc = FakeLibc()
    assert allocator.apply_env({"VITKIT_MALLOC": "system"}, libc) is False
    assert libc.calls == []
    assert allocator.apply_env({}, libc) is True
    assert len(libc.calls) == 2


def test_cli_entry_applies_the_setting_and_main_does_not(monkeypatch, capsys):
    applied, ran = [], []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda libc=None: applied.append(1) or True)
    monkeypatch.delenv("VITKIT_MALLOC", raising=False)
    assert cli.main(["train", "--epochs", "0"]) == 2  # the real main, in-process: the allocator stays alone
    assert "epochs must be a positive integer" in capsys.readouterr().err
    assert applied == []
    monkeypatch.setattr(cli, "main", lambda argv=None: ran.append(argv) or 0)
    assert cli.entry(["models"]) == 0
    assert applied == [1] and ran == [["models"]]
    monkeypatch.setenv("VITKIT_MALLOC", "system")
    assert cli.entry(["models"]) == 0
    assert applied == [1] and len(ran) == 2


def test_cli_entry_refuses_a_bad_setting(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli, "main", lambda argv=None: ran.append(argv) or 0)
    monkeypatch.setenv("VITKIT_MALLOC", "tcmalloc")
    assert cli.entry(["models"]) == 2
    assert ran == []
    assert "VITKIT_MALLOC='tcmalloc' is not a setting" in capsys.readouterr().err


# A child process (fresh allocator state): malloc 16 MiB, touch it, free it, and print the resident memory that
# stayed, in MiB. glibc's default serves 16 MiB with its own mapping and unmaps it on free; kept, it stays.
CHILD = textwrap.dedent(
    """
    import ctypes, importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    if sys.argv[2] == "keep":
        assert allocator.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    base = rss()
    p = libc.malloc(16 * 2**20)
    ctypes.memset(p, 1, 16 * 2**20)
    libc.free(p)
    print((rss() - base) / 2**20)
    """
)


@pytest.mark.skipif(allocator.glibc() is None or sys.platform != "linux", reason="glibc on Linux only")
def test_kept_memory_stays_resident():
    def stayed(setting: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, allocator.__file__, setting], capture_output=True, text=True, check=True
        )
        return float(out.stdout)

    assert stayed("system") < 4  # unmapped on free
    assert stayed("keep") > 12  # the 16 MiB stayed in the heap
