"""Our model classes against the community checkpoints' state_dict manifests (shared/manifests/*.json).

For every manifest: ``create(m["model"], num_classes=1000)`` must have exactly the listed state_dict keys
(in order), shapes and dtypes, split into the same parameters and buffers. A model that is not
registered yet fails here on purpose. The round trip writes a synthetic checkpoint in the manifest's
file layout (top level and key prefix) and loads it strictly with ``load_into``.
"""

import json
from pathlib import Path

import pytest
import torch

from diffmi_ray.models import create, get_info
from diffmi_ray.models.checkpoints import load_into, save_checkpoint

MANIFEST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "manifests"
MANIFESTS = sorted(p for p in MANIFEST_DIR.glob("*.json") if p.name != "index.json") if MANIFEST_DIR.is_dir() else []
NEEDS_DIR = pytest.mark.skipif(not MANIFEST_DIR.is_dir(), reason=f"manifest folder {MANIFEST_DIR} not present")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _build(name: str, device: str = "meta") -> torch.nn.Module:
    """The registered model at the community settings; on the meta device (no memory, no init) if it
    supports that, else on the CPU."""
    if device == "meta":
        try:
            with torch.device("meta"):
                return create(name, num_classes=1000)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            pass
    return create(name, num_classes=1000)


def _rows(named):
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in named]


def _want(rows):
    return [(k, list(s), d) for k, s, d in rows]


def _diff(got, want) -> str:
    g, w = dict((k, (s, d)) for k, s, d in got), dict((k, (s, d)) for k, s, d in want)
    missing = [k for k in w if k not in g][:5]
    extra = [k for k in g if k not in w][:5]
    shape = [(k, g[k], w[k]) for k in w if k in g and g[k] != w[k]][:5]
    order = "" if missing or extra else " (same set; order differs)"
    return f"missing {missing}, unexpected {extra}, shape/dtype (ours, manifest) {shape}{order}"


@NEEDS_DIR
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_state_dict_matches_manifest(path):
    m = _load(path)
    net = _build(m["model"])
    got, want = _rows(net.state_dict().items()), _want(m["state_dict"])
    assert got == want, _diff(got, want)
    got_p, want_p = _rows(net.named_parameters()), _want(m["parameters"])
    assert got_p == want_p, "parameters: " + _diff(got_p, want_p)
    got_b, want_b = _rows(net.named_buffers()), _want(m["buffers"])
    assert got_b == want_b, "buffers: " + _diff(got_b, want_b)
    assert sum(v.numel() for v in net.parameters()) == m["num_parameters"]


def _top_level(m: dict, sd: dict) -> object:
    """Wrap ``sd`` like the shared file (see each manifest's checkpoint_format)."""
    fmt = m["checkpoint_format"]
    sd = {m["checkpoint_key_prefix"] + k: v for k, v in sd.items()}
    if fmt.startswith("Raw state_dict"):
        return sd
    if "{'model'" in fmt:
        return {"model": sd, "opt": {"state": {}, "param_groups": []}}
    assert "{'state_dict'" in fmt, f"unknown checkpoint_format: {fmt[:80]}"
    return {"state_dict": sd}


@NEEDS_DIR
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_synthetic_checkpoint_round_trip(path, tmp_path):
    m = _load(path)
    try:
        get_info(m["model"])
    except KeyError:
        pytest.skip(f"model {m['model']!r} is not registered yet")
    # Zeros of the listed shapes/dtypes. Each is a stride-0 view of one element, so the file stays
    # a few KB whatever the model size; torch.save keeps the view and loading restores the shape.
    sd = {k: torch.zeros((), dtype=getattr(torch, d)).expand(s) for k, s, d in m["state_dict"]}
    ckpt = save_checkpoint(_top_level(m, sd), tmp_path / "ckpt.tar")
    net = _build(m["model"])
    if any(t.is_meta for t in net.state_dict().values()):
        net = net.to_empty(device="cpu")  # allocate without running the initialisers
    rep = load_into(net, ckpt, strict=True)
    assert rep.ok
    got = net.state_dict()
    for k, _, d in m["state_dict"]:
        assert str(got[k].dtype) == f"torch.{d}"
        assert not got[k].any(), k
