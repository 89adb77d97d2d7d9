"""Plan a grid into a DAG of stage instances with content keys (ARCHITECTURE.md §1).

Stage instances of one grid point, by role::

    split ─┬─ target (train_classifier) ─┬─ pseudo_labels ─┬─ prior (train_prior) ─ finetune (finetune_cdm)
           │                             │                 │                              │
           └─ eval  (train_classifier)   └─────────────────┴────────── attack ────────────┘
                                                                          │
                                                              evaluate (attack, eval, split)

Each instance's config holds exactly what it depends on, so e.g. changing an attack's k changes only
the attack and evaluate keys, while changing the public dataset changes the split key and so
everything downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffmi_ray.config.experiment import STAGES, ExperimentConfig, ProtocolConfig
from diffmi_ray.pipeline.keys import content_key

# Bump a stage's version when its code changes what it produces: old artifacts then stop matching.
STAGE_VERSIONS = {s: 1 for s in STAGES}


@dataclass(frozen=True)
class StageInstance:
    """One unique unit of work. ``parents`` maps a role to the parent's ``(stage, key)``."""

    stage: str
    key: str
    config: dict
    parents: dict[str, tuple[str, str]]
    label: str

    @property
    def id(self) -> tuple[str, str]:
        return (self.stage, self.key)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "key": self.key, "config": self.config, "label": self.label,
                "parents": {r: list(p) for r, p in self.parents.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "StageInstance":
        return cls(d["stage"], d["key"], d["config"], {r: tuple(p) for r, p in d["parents"].items()}, d["label"])


def _inst(stage: str, config: dict, parents: dict[str, StageInstance], label: str) -> StageInstance:
    pkeys = {role: f"{p.stage}/{p.key}" for role, p in parents.items()}
    key = content_key(stage, config, pkeys, STAGE_VERSIONS[stage])
    return StageInstance(stage, key, config, {r: p.id for r, p in parents.items()}, label)


def plan_point(cfg: ExperimentConfig, protocol: ProtocolConfig) -> dict[str, StageInstance]:
    """Stage instances of one grid point, by role (split, target, eval, pseudo_labels, prior,
    finetune, attack, evaluate; pseudo_labels and finetune only where the method uses them)."""
    seed = cfg.seed
    geometry = {"image_size": cfg.data.image_size, "channels": cfg.data.channels}
    roles: dict[str, StageInstance] = {}

    split = _inst("split", {"data": cfg.data.model_dump(mode="json"), "seed": seed}, {},
                  f"split {cfg.data.private.dataset}/{cfg.data.public.dataset}")
    roles["split"] = split
    target = _inst("train_classifier", {"classifier": cfg.target.model_dump(mode="json"), **geometry, "seed": seed},
                   {"split": split}, f"classifier {cfg.target.model}")
    roles["target"] = target
    evalc = _inst("train_classifier", {"classifier": protocol.eval.model_dump(mode="json"), **geometry, "seed": seed},
                  {"split": split}, f"classifier {protocol.eval.model}")
    roles["eval"] = evalc

    mc = cfg.method_config()
    if mc.uses_pseudo_labels:
        roles["pseudo_labels"] = _inst("pseudo_labels", {"pseudo_labels": cfg.pseudo_labels.model_dump(mode="json"),
                                                         "seed": seed},
                                       {"split": split, "target": target}, f"pseudo_labels top{cfg.pseudo_labels.top_n}")
    prior_parents = {"split": split}
    if mc.uses_pseudo_labels:
        prior_parents["pseudo_labels"] = roles["pseudo_labels"]
    if mc.uses_target_in_prior:
        prior_parents["target"] = target
    prior = _inst("train_prior", {"kind": mc.prior_kind, "prior": mc.prior.model_dump(mode="json"), **geometry,
                                  "seed": seed}, prior_parents, f"prior {mc.prior_kind}")
    roles["prior"] = prior

    generator = prior
    if cfg.method == "diff_mi" and mc.finetune.enabled:
        ft = mc.finetune.model_dump(mode="json")
        ft.pop("enabled")
        ft["classes"] = ft["classes"] or protocol.classes
        roles["finetune"] = _inst("finetune_cdm", {"finetune": ft, "seed": seed},
                                  {"prior": prior, "target": target, "pseudo_labels": roles["pseudo_labels"]},
                                  f"finetune_cdm L={mc.finetune.layers}")
        generator = roles["finetune"]

    attack_parents = {"generator": generator, "target": target, "split": split}
    if mc.uses_pseudo_labels:
        attack_parents["pseudo_labels"] = roles["pseudo_labels"]
    roles["attack"] = _inst("attack", {"method": cfg.method, "attack": mc.attack.model_dump(mode="json"),
                                       "classes": protocol.classes, "images_per_class": protocol.images_per_class,
                                       "seed": seed}, attack_parents, f"attack {cfg.method}")
    roles["evaluate"] = _inst("evaluate", {"evaluation": protocol.evaluation.model_dump(mode="json"),
                                           "classes": protocol.classes, "images_per_class": protocol.images_per_class,
                                           "reference_images_per_class": protocol.reference_images_per_class},
                              {"attack": roles["attack"], "eval": evalc, "split": split}, f"evaluate {cfg.method}")
    return roles


@dataclass
class Plan:
    """The DAG of a grid: unique instances and, per grid point, its instance of each role."""

    instances: dict[tuple[str, str], StageInstance] = field(default_factory=dict)
    points: list[tuple[object, dict[str, StageInstance]]] = field(default_factory=list)

    def by_stage(self) -> dict[str, list[StageInstance]]:
        out: dict[str, list[StageInstance]] = {s: [] for s in STAGES}
        for inst in self.instances.values():
            out[inst.stage].append(inst)
        return out

    def waves(self) -> list[list[StageInstance]]:
        """Topological layers: every instance's parents lie in earlier waves."""
        depth: dict[tuple[str, str], int] = {}

        def d(i: StageInstance) -> int:
            if i.id not in depth:
                depth[i.id] = 1 + max((d(self.instances[p]) for p in i.parents.values()), default=-1)
            return depth[i.id]

        for inst in self.instances.values():
            d(inst)
        n = max(depth.values(), default=-1) + 1
        waves: list[list[StageInstance]] = [[] for _ in range(n)]
        for inst in self.instances.values():
            waves[depth[inst.id]].append(inst)
        return waves

    def ancestors(self, inst: StageInstance) -> list[StageInstance]:
        seen: dict[tuple[str, str], StageInstance] = {}

        def walk(i: StageInstance):
            for p in i.parents.values():
                if p not in seen:
                    seen[p] = self.instances[p]
                    walk(seen[p])

        walk(inst)
        return list(seen.values())


def plan_grid(loaded) -> Plan:
    """Plan every point of a LoadedGrid, deduplicating shared instances by key."""
    plan = Plan()
    for point in loaded.points:
        roles = plan_point(point.config, loaded.grid.protocol)
        for inst in roles.values():
            plan.instances.setdefault(inst.id, inst)
        plan.points.append((point, roles))
    return plan
