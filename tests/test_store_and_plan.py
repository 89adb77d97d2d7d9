"""Content keys (stability and sensitivity), atomic artifact writes, and the planner's DAG."""

from __future__ import annotations

import copy
import json

import pytest

from diffmi_ray.cli import main
from diffmi_ray.config.loader import load_grid
from diffmi_ray.pipeline.keys import canonical_json, content_key
from diffmi_ray.pipeline.plan import plan_grid, plan_point
from diffmi_ray.pipeline.store import MARKER, ArtifactStore


def test_key_is_stable_and_order_independent():
    a = content_key("attack", {"x": 1, "y": [1, 2.0], "z": {"b": 1, "a": 0.5}}, {"p": "s/k"})
    b = content_key("attack", {"z": {"a": 0.5, "b": 1}, "y": [1, 2], "x": 1.0}, {"p": "s/k"})
    assert a == b
    # pinned: the key format must not change silently (it would orphan every stored artifact)
    assert content_key("split", {"seed": 0}, {}) == "caf86c013743e114"
    # a new optional field (None) keeps existing keys; nested too
    assert content_key("split", {"seed": 0, "new": None}, {}) == "caf86c013743e114"
    assert content_key("attack", {"a": {"b": 1, "c": None}}, {}) == content_key("attack", {"a": {"b": 1}}, {})
    assert content_key("attack", {"a": [None]}, {}) != content_key("attack", {"a": []}, {})
    assert canonical_json({"b": (1, 2.5), "a": None}) == '{"a":null,"b":[1,2.5]}'


def test_key_sensitivity():
    base = content_key("attack", {"k": 1}, {"prior": "train_prior/abc"})
    assert content_key("attack", {"k": 2}, {"prior": "train_prior/abc"}) != base
    assert content_key("attack", {"k": 1}, {"prior": "train_prior/abd"}) != base
    assert content_key("evaluate", {"k": 1}, {"prior": "train_prior/abc"}) != base


def test_planner_keys_depend_on_exactly_their_fields(repo_root):
    loaded = load_grid(repo_root / "grids" / "quickstart.yaml")
    cfg, proto = loaded.points[0].config, loaded.grid.protocol
    assert cfg.method == "diff_mi"
    r0 = plan_point(cfg, proto)

    c1 = cfg.model_copy(deep=True)
    c1.diff_mi.attack.k = 3  # attack option: only attack + evaluate change
    r1 = plan_point(c1, proto)
    changed = {role for role in r0 if r0[role].key != r1[role].key}
    assert changed == {"attack", "evaluate"}

    c2 = cfg.model_copy(deep=True)
    c2.diff_mi.finetune.layers = 3  # fine-tuning option: finetune and below
    changed = {role for role, i in plan_point(c2, proto).items() if i.key != r0[role].key}
    assert changed == {"finetune", "attack", "evaluate"}

    c3 = cfg.model_copy(deep=True)
    c3.data.public.classes = [6, 7, 8, 9]  # public data: the split and so everything
    changed = {role for role, i in plan_point(c3, proto).items() if i.key != r0[role].key}
    assert changed == set(r0)

    c4 = cfg.model_copy(deep=True)
    c4.diff_mi.finetune.enabled = False
    r4 = plan_point(c4, proto)
    assert "finetune" not in r4 and r4["prior"].key == r0["prior"].key


def test_shared_priors_deduplicate(repo_root):
    loaded = load_grid(repo_root / "grids" / "quickstart.yaml")
    plan = plan_grid(loaded)
    by = plan.by_stage()
    assert len(loaded.points) == 4
    assert len(by["split"]) == 1 and len(by["train_classifier"]) == 2  # target + eval, shared by all points
    assert len(by["attack"]) == 4 and len(by["evaluate"]) == 4
    assert len(by["pseudo_labels"]) == 1  # diff_mi and plgmi share top-n with the same config
    waves = plan.waves()
    pos = {i.id: n for n, w in enumerate(waves) for i in w}
    for inst in plan.instances.values():
        assert all(pos[p] < pos[inst.id] for p in inst.parents.values())


def test_atomic_write_and_marker(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer("s", "k1", {"a": 1}) as out:
        (out / "data.txt").write_text("hello")
        assert not store.is_done("s", "k1")
    assert store.is_done("s", "k1")
    p = store.local_path("s", "k1")
    assert (p / "data.txt").read_text() == "hello" and (p / MARKER).exists()
    assert json.loads((p / "config.json").read_text()) == {"a": 1}
    assert store.done_keys("s") == {"k1"}


def test_exception_mid_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("s", "k2", {}) as out:
            (out / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert not store.is_done("s", "k2")
    assert not (tmp_path / "artifacts" / "s" / "k2").exists()
    assert [p.name for p in (tmp_path / "artifacts" / "s").iterdir()] == []  # temp folder removed
    with pytest.raises(FileNotFoundError):
        store.local_path("s", "k2")


def test_unfinished_final_folder_is_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    final = tmp_path / "artifacts" / "s" / "k3"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("from a crash between rename and marker")
    assert not store.is_done("s", "k3")
    with store.writer("s", "k3", {}) as out:
        (out / "fresh.txt").write_text("ok")
    assert store.is_done("s", "k3") and not (final / "stale.txt").exists()


def test_fsspec_memory_store(tmp_path):
    store = ArtifactStore("memory://diffmi-test-store", cache_dir=tmp_path / "cache")
    with store.writer("s", "k", {"x": 1}) as out:
        (out / "f.txt").write_text("remote")
    assert store.is_done("s", "k") and store.done_keys("s") == {"k"}
    assert (store.local_path("s", "k") / "f.txt").read_text() == "remote"


def test_cli_plan_counts_done(repo_root, tmp_path, capsys):
    grid = repo_root / "grids" / "quickstart.yaml"
    loaded = load_grid(grid)
    plan = plan_grid(loaded)
    store = ArtifactStore(tmp_path)
    split = plan.by_stage()["split"][0]
    with store.writer("split", split.key, {}):
        pass
    assert main(["plan", str(grid), "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 grid point(s)" in out
    assert "split                1 needed     1 done" in out
    assert "attack               4 needed     0 done" in out
