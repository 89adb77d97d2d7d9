"""Checkpoint reading (formats, prefixes, refusal of pickled code), strict loading, atomic saving."""

import os

import pytest
import torch
from torch import nn

from diffmi_ray.errors import UserError
from diffmi_ray.models.checkpoints import (
    compare_state_dict,
    extract_state_dict,
    load_into,
    load_state_dict_file,
    save_checkpoint,
    strip_prefix,
)


class Custom:
    """A class that only pickle can restore: weights_only loading must refuse it."""

    def __init__(self):
        self.value = 3


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))


def _prefixed(sd, prefix="module."):
    return {prefix + k: v for k, v in sd.items()}


FORMATS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd},
    "state_dict+module": lambda sd: {"state_dict": _prefixed(sd)},
    "model+opt": lambda sd: {"model": sd, "opt": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
    "raw+module": lambda sd: _prefixed(sd),
    "compiled+ddp": lambda sd: _prefixed(_prefixed(sd, "_orig_mod."), "module."),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_load_to_the_bare_state_dict(tmp_path, fmt):
    sd = _net().state_dict()
    path = save_checkpoint(FORMATS[fmt](sd), tmp_path / f"{fmt}.pt")
    got = load_state_dict_file(path)
    assert list(got) == list(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k])
    fresh = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    rep = load_into(fresh, path)
    assert rep.ok
    assert torch.equal(fresh[0].weight, sd["0.weight"])
    assert fresh[1].num_batches_tracked.dtype == torch.int64


def test_explicit_key_and_unknown_layout(tmp_path):
    sd = _net().state_dict()
    path = save_checkpoint({"ema": sd, "step": 7}, tmp_path / "ema.pt")
    with pytest.raises(UserError, match=r"pass key=.*|top-level keys"):
        load_state_dict_file(path)
    assert list(load_state_dict_file(path, key="ema")) == list(sd)
    with pytest.raises(UserError, match="no top-level key 'weights'"):
        load_state_dict_file(path, key="weights")
    with pytest.raises(UserError, match="does not hold a state_dict"):
        load_state_dict_file(path, key="step")


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _net().state_dict(), "extra": Custom()}, path)
    with pytest.raises(UserError) as ei:
        load_state_dict_file(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "refusing to load" in msg and "pickled Python code" in msg and "weights_only" in msg


def test_refuses_whole_pickled_module(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(_net(), path)
    with pytest.raises(UserError, match="refusing to load"):
        load_state_dict_file(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_state_dict_file(bad)


def test_strict_mismatch_lists_keys(tmp_path):
    sd = _net().state_dict()
    sd.pop("3.bias")
    sd["3.weight"] = torch.zeros(5, 2)
    sd["extra.weight"] = torch.zeros(1)
    path = save_checkpoint({"state_dict": _prefixed(sd)}, tmp_path / "m.tar")
    target = _net()
    before = target[0].weight.detach().clone()
    with pytest.raises(UserError) as ei:
        load_into(target, path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "1 missing from the file: 3.bias" in msg
    assert "1 unexpected in the file: extra.weight" in msg
    assert "3.weight file [5, 2] vs model [3, 2]" in msg
    assert torch.equal(target[0].weight, before)  # nothing loaded on failure


def test_non_strict_loads_what_fits(tmp_path):
    src = _net()
    with torch.no_grad():
        src[0].weight.fill_(0.5)
    sd = src.state_dict()
    sd["3.weight"] = torch.zeros(5, 2)
    path = save_checkpoint(sd, tmp_path / "m.pt")
    target = _net()
    rep = load_into(target, path, strict=False)
    assert not rep.ok and [k for k, _, _ in rep.mismatched] == ["3.weight"]
    assert torch.all(target[0].weight == 0.5)
    assert target[3].weight.shape == (3, 2)


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    sd = {k: v for k, v in _net().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = save_checkpoint(sd, tmp_path / "old.pt")
    assert load_into(_net(), path).ok


def test_dataparallel_target(tmp_path):
    sd = _net().state_dict()
    path = save_checkpoint({"state_dict": _prefixed(sd)}, tmp_path / "dp.tar")
    wrapped = nn.DataParallel(_net())
    assert load_into(wrapped, path).ok


def test_helpers():
    assert strip_prefix({"module.a": torch.zeros(1), "module.b": torch.zeros(1)}).keys() == {"a", "b"}
    assert strip_prefix({"module.a": torch.zeros(1), "b": torch.zeros(1)}).keys() == {"module.a", "b"}
    with pytest.raises(UserError, match="holds a list"):
        extract_state_dict([1, 2], source="x")
    assert compare_state_dict(_net(), _net().state_dict()).ok


def test_save_is_atomic(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint({"a": torch.ones(2)}, path)
    assert os.listdir(path.parent) == ["ck.pt"]
    # a failing save leaves the previous file intact and no temp file behind
    with pytest.raises(Exception):
        save_checkpoint({"a": lambda: 0}, path)
    assert os.listdir(path.parent) == ["ck.pt"]
    assert torch.equal(load_state_dict_file(path)["a"], torch.ones(2))
