"""cluster.yaml, validated offline the way `ray up` would: Ray's own JSON schema (draft-07), then
Ray's own config preparation (defaults merged) and validation. Broken copies must fail."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_checks(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema_and_config_checks(config, schema):
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(config)
    prepared = ray_checks(config)
    types = prepared["available_node_types"]
    assert set(types) == {"head", "gpu_1x", "gpu_8x"} and prepared["head_node_type"] == "head"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]


def test_cluster_yaml_shape(config):
    import ray

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # the head runs the trial/Train drivers (custom resource) and has no GPU
    assert head["resources"]["trial_driver"] >= 8
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    # spot single-GPU workers for attacks
    spot = types["gpu_1x"]["node_config"]
    assert spot["InstanceType"] == "g5.xlarge" and spot["InstanceMarketOptions"]["MarketType"] == "spot"
    # workers write artifacts to S3: `ray up` gives only the head a default instance profile
    for name in ("gpu_1x", "gpu_8x"):
        assert "instance-profile/" in types[name]["node_config"]["IamInstanceProfile"]["Arn"]
    # a multi-GPU type for CDM pretraining
    assert types["gpu_8x"]["node_config"]["InstanceType"] in ("p4d.24xlarge", "g5.12xlarge")
    # setup installs ray[default] (State API, dashboard) at the local version, and this project
    setup = "\n".join(config["setup_commands"])
    assert f"ray[default,tune,train]=={ray.__version__}" in setup
    assert "pip install -q -e /home/ubuntu/diffmi_ray" in setup and "s3fs" in setup
    assert config["file_mounts"] == {"/home/ubuntu/diffmi_ray": "."}
    # the dashboard is never bound to a public interface
    start = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in json.dumps(config)


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.pop("provider"), jsonschema.ValidationError),
    (lambda c: c.update(storage_root="s3://bucket"), jsonschema.ValidationError),  # unknown top-level key
    (lambda c: c["available_node_types"]["gpu_1x"].update(gpus=1), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_1x"].pop("node_config"), jsonschema.ValidationError),
    (lambda c: c.update(max_workers="ten"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="gpu_head"), ValueError),  # not one of available_node_types
    (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=11), ValueError),  # > max_workers
])
def test_broken_copies_fail(config, schema, breakage, error):
    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises(error):
        jsonschema.Draft7Validator(schema).validate(broken)
        ray_checks(broken)


def test_node_configs_match_the_ec2_api(config):
    """node_config keys are RunInstances parameters (botocore's bundled EC2 model, offline)."""
    botocore_session = pytest.importorskip("botocore.session", reason="botocore not installed")
    model = botocore_session.get_session().get_service_model("ec2")
    members = model.operation_model("RunInstances").input_shape.members
    for name, nt in config["available_node_types"].items():
        unknown = set(nt["node_config"]) - set(members)
        assert not unknown, f"{name}: not RunInstances parameters: {unknown}"
    assert os.path.basename(str(REPO / "cluster.yaml")) == "cluster.yaml"
