"""Attacks: the contract (:mod:`.base`), shared losses (:mod:`.losses`), one module per method."""

from diffmi_ray.attacks.base import Attack, AttackInputs, AttackOutput, get_attack, names, register

__all__ = ["Attack", "AttackInputs", "AttackOutput", "get_attack", "names", "register"]
