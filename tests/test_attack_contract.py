"""One contract test over every registered attack, with priors trained by the real stages.

Runs the upstream stages of a tiny grid (all six methods) in-process, then checks for each attack:
output shapes and [0,1] range, labels honoured in order, determinism under a seed, batch independence.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from diffmi_ray.attacks import AttackInputs, get_attack, names
from diffmi_ray.config.loader import load_grid
from diffmi_ray.pipeline.execute import run_instance
from diffmi_ray.pipeline.plan import plan_grid
from diffmi_ray.pipeline.stages.split import data_config_of, load as load_split
from diffmi_ray.pipeline.stages.train_classifier import load_classifier
from diffmi_ray.pipeline.execute import parents_of
from diffmi_ray.pipeline.store import ArtifactStore

TINY = {
    "vmi": {"steps": 3, "batch_size": 4},
    "ppa": {"candidates": 40, "keep": 4, "iterations": 2, "final_transforms": 2},
    "kedmi": {"iterations": 3, "batch_size": 4},
    "plgmi": {"iterations": 3, "restarts": 1},
}


def test_every_method_is_registered():
    assert names() == ["diff_mi", "gmi", "kedmi", "plgmi", "ppa", "vmi"]
    with pytest.raises(KeyError, match="valid: \\['diff_mi'"):
        get_attack("nope")


@pytest.fixture(scope="module")
def upstream(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    grid = tmp / "contract.yaml"
    shutil.copy(repo_root / "grids" / "smoke.yaml", tmp / "smoke.yaml")
    (tmp / "cpu").mkdir()
    shutil.copy(repo_root / "grids" / "cpu" / "_mnist_base.yaml", tmp / "cpu" / "_mnist_base.yaml")
    grid.write_text(f"""include: smoke.yaml
name: contract
storage: {tmp / 'store'}
base:
  kedmi: {{prior: {{arch: {{width: 8}}, train: {{iterations: 2, batch_size: 16, n_critic: 1}}}}}}
  plgmi: {{prior: {{arch: {{width: 8, z_dim: 16}}, train: {{iterations: 2, batch_size: 8, n_critic: 1}}}}}}
  vmi: {{prior: {{arch: {{width: 8}}, train: {{iterations: 3, batch_size: 16, n_critic: 1, checkpoint_every: 2}}}}}}
  ppa: {{prior: {{arch: {{width: 8}}, train: {{iterations: 3, batch_size: 16, n_critic: 1, checkpoint_every: 2}}}}}}
  diff_mi: {{finetune: {{enabled: false}}}}
axes:
  method: [diff_mi, gmi, kedmi, plgmi, vmi, ppa]
""")
    loaded = load_grid(grid)
    plan = plan_grid(loaded)
    store = ArtifactStore(tmp / "store")
    for wave in plan.waves():
        for inst in wave:
            if inst.stage not in ("attack", "evaluate"):
                run_instance(inst, store, device="cpu", log=lambda s: None)
    return plan, store


@pytest.mark.parametrize("method", ["diff_mi", "gmi", "kedmi", "plgmi", "vmi", "ppa"])
def test_attack_contract(method, upstream):
    torch.set_num_threads(1)
    plan, store = upstream
    roles = next(r for p, r in plan.points if p.config.method == method)
    inst = roles["attack"]
    parents = parents_of(inst, store)
    data = data_config_of(parents["split"])
    split = load_split(parents["split"].path)
    shape = (data.channels, data.image_size, data.image_size)
    inputs = AttackInputs(target=load_classifier(parents["target"].path, "cpu"), num_classes=split.num_classes,
                          image_shape=shape, generator_dir=parents["generator"].path,
                          generator_config=parents["generator"].config,
                          pseudo_labels_dir=parents["pseudo_labels"].path if "pseudo_labels" in parents else None)
    cfg = dict(inst.config["attack"])
    cfg.update(TINY.get(method, {}))
    attack = get_attack(method)(cfg, inputs)
    labels = torch.tensor([1, 0, 1, 2])
    out = attack.invert(labels, seed=3)
    out.validate(shape)  # shape, finite, [0, 1]
    assert torch.equal(out.labels.cpu(), labels)
    again = attack.invert(labels, seed=3)
    assert torch.allclose(out.images, again.images, atol=1e-5), "not deterministic under a seed"
    other = attack.invert(labels, seed=4)
    assert not torch.allclose(out.images, other.images), "the seed has no effect"
    # (class, repeat) keys the randomness: the first two images come out the same in a smaller batch
    part = attack.invert(labels[:2], seed=3)
    assert torch.allclose(part.images, out.images[:2], atol=1e-4), "result depends on the batch"
