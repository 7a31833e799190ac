"""Checkpoint files are read without running code from them."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import vitkit
from vitkit.weights import read_npz, read_state_dict, unwrap_state_dict


class RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_pickle_that_runs_code_is_refused(tmp_path, suffix, container):
    sentinel = tmp_path / "SENTINEL"
    payload = {"pos_embed": torch.zeros(1, 5, 8), "evil": RunsCode(f"touch {sentinel}")}
    path = tmp_path / f"evil{suffix}"
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="refusing to unpickle .*: it contains code/objects beyond tensors"):
        vitkit.load_model(path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(path)
    assert not sentinel.exists()


def test_refusal_names_the_offending_object(tmp_path):
    torch.save({"x": RunsCode("true")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="system") as e:
        read_state_dict(tmp_path / "evil.pth")
    assert "weights_only=False" not in str(e.value)  # never suggest turning the protection off


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*junk.pth"):
        vitkit.load_model(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="junk.safetensors is incomplete or corrupt"):
        vitkit.load_model(tmp_path / "junk.safetensors")


def test_npz_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", good=np.zeros(3), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="refusing to load .*pickled object arrays"):
        read_npz(tmp_path / "obj.npz")


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        vitkit.load_model("/nonexistent/vit.pth")


def test_unwrap_rejects_dicts_without_weights():
    with pytest.raises(ValueError, match="cannot find the weights.*'epoch'"):
        unwrap_state_dict({"epoch": 3, "lr": 0.1}, source="ckpt")


def test_unwrap_uses_ema_when_it_is_all_there_is(lines):
    state = unwrap_state_dict({"model_ema": {"w": torch.ones(1)}, "epoch": 1}, source="ckpt", log=lines)
    assert torch.equal(state["w"], torch.ones(1))
    assert "using the weights under 'model_ema'" in lines.text()


def test_unwrap_strips_torch_compile_prefix(lines):
    state = unwrap_state_dict({"_orig_mod.w": torch.ones(1)}, source="ckpt", log=lines)
    assert list(state) == ["w"] and "'_orig_mod.' prefix" in lines.text()
