"""ray_cluster.yaml validated offline (Ray's prepare_config + validate_config, then the project's checks),
and the role placement of cir_actors/ops/cluster.py that the YAML must agree with. No Ray runtime, no cloud."""

from __future__ import annotations

import copy

import pytest
import yaml

from cir_actors.config import load_config
from cir_actors.ops import cluster
from cir_actors.ops.cluster import (
    CLUSTER_YAML,
    ClusterConfigError,
    Role,
    actor_name,
    actor_options,
    check_cluster_yaml,
    check_fits,
    resource_names,
)
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def prepared():
    return check_cluster_yaml(CLUSTER_YAML)


@pytest.fixture()
def raw():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def write(tmp_path, tree) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_yaml_passes_ray_and_project_checks(prepared):
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "ray.head.default"
    assert set(types) == {"ray.head.default", "generator.gpu", "learner.gpu", "interpreter.cpu"}
    assert all(spec["node_config"]["InstanceType"] for spec in types.values())
    assert types["generator.gpu"]["resources"]["GPU"] >= 1 and types["learner.gpu"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["interpreter.cpu"]["resources"] and "GPU" not in types["ray.head.default"]["resources"]
    assert prepared["idle_timeout_minutes"] > 0
    assert all(spec["max_workers"] >= 1 for name, spec in types.items() if name != "ray.head.default")
    # Setup installs the project with the GPU extra on every node; Ray runs from that venv with its
    # bin first on PATH (the job's `python`), token authentication on, the token mounted everywhere.
    assert any("make venv" in c and "EXTRA=gpu" in c for c in prepared["setup_commands"])
    for start in (prepared["head_start_ray_commands"][-1], prepared["worker_start_ray_commands"][-1]):
        assert "PATH=$HOME/cir-actors/.venv/bin:$PATH" in start and "RAY_AUTH_MODE=token" in start
    assert prepared["file_mounts"] == {"~/cir-actors": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert ".gitignore" in prepared["rsync_filter"]


def test_yaml_provides_exactly_the_role_resources_the_code_asks_for(prepared):
    provided = {
        r for spec in prepared["available_node_types"].values() for r in spec["resources"] if r not in ("CPU", "GPU")
    }
    assert provided == resource_names() == {"generator", "learner", "interpreter", "head"}
    by_resource = {
        r: [n for n, s in prepared["available_node_types"].items() if r in s["resources"]] for r in provided
    }
    assert by_resource == {
        "generator": ["generator.gpu"],
        "learner": ["learner.gpu"],
        "interpreter": ["interpreter.cpu"],
        "head": ["ray.head.default"],
    }


@pytest.mark.parametrize("config_file", ["configs/qwen2.5-math-7b.yaml", "configs/tiny_cpu.yaml"])
def test_every_role_fits_a_node_type(prepared, config_file):
    check_fits(prepared, load_config(PROJECT_ROOT / config_file))


def test_a_role_too_big_for_its_node_type_is_named(prepared):
    cfg = load_config(None, ["generator.num_gpus=2"])
    with pytest.raises(ClusterConfigError, match="generator"):
        check_fits(prepared, cfg)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(idle_timout_minutes=t.pop("idle_timeout_minutes")), "idle_timout_minutes"),
        (lambda t: t["available_node_types"]["generator.gpu"].update(max_worker=4), "max_worker"),
        (lambda t: t["available_node_types"]["learner.gpu"].pop("node_config"), "node_config"),
        (lambda t: t["available_node_types"]["generator.gpu"]["resources"].update(GPU=0.5), "0.5"),
    ],
    ids=["top-level typo", "node-type typo", "missing node_config", "fractional resource"],
)
def test_ray_schema_rejects(tmp_path, raw, mutate, message):
    mutate(raw)
    with pytest.raises(ClusterConfigError, match=message):
        check_cluster_yaml(write(tmp_path, raw))


def _rename_resource(t):
    res = t["available_node_types"]["generator.gpu"]["resources"]
    res["generater"] = res.pop("generator")


def _move_head_resource(t):
    types = t["available_node_types"]
    types["interpreter.cpu"]["resources"]["head"] = types["ray.head.default"]["resources"].pop("head")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_rename_resource, r"no node type provides the role resource\(s\) \['generator'\]"),
        (lambda t: t["available_node_types"]["interpreter.cpu"].update(min_workers=5, max_workers=2),
         "min_workers 5 > max_workers 2"),
        (lambda t: t["available_node_types"]["learner.gpu"]["node_config"].pop("InstanceType"), "InstanceType"),
        (_move_head_resource, "must provide 'head'"),
        (lambda t: t["available_node_types"]["learner.gpu"]["resources"].pop("GPU"), "'learner' has a GPU"),
        (lambda t: t["available_node_types"]["interpreter.cpu"].update(max_workers=0), "can never start"),
    ],
    ids=["resource typo", "min > max", "no instance type", "head lacks head", "learner without GPU", "max 0"],
)
def test_project_checks_reject_what_the_schema_lets_through(tmp_path, raw, mutate, message):
    mutate(raw)
    with pytest.raises(ClusterConfigError, match=message):
        check_cluster_yaml(write(tmp_path, raw))


def test_bad_files_get_one_sentence(tmp_path):
    with pytest.raises(ClusterConfigError, match="does not exist"):
        check_cluster_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        check_cluster_yaml(bad)


def test_check_cli(tmp_path, raw, capsys):
    assert cluster.main(["check", str(CLUSTER_YAML), "--config", str(PROJECT_ROOT / "configs/qwen2.5-math-7b.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    too_big = tmp_path / "big.yaml"
    too_big.write_text("learner:\n  num_gpus: 16\n")
    assert cluster.main(["check", str(CLUSTER_YAML), "--config", str(too_big)]) == 1
    assert "learner" in capsys.readouterr().err
    raw["available_node_types"]["generator.gpu"]["max_worker"] = 1
    assert cluster.main(["check", write(tmp_path, raw)]) == 1
    assert "max_worker" in capsys.readouterr().err


def test_actor_names():
    assert [actor_name(Role.GENERATOR, 0), actor_name("interpreter", 2), actor_name(Role.LEARNER, 1)] == [
        "generator-0",
        "interpreter-2",
        "learner-rank-1",
    ]
    assert [actor_name(Role.SCORER, 0), actor_name(Role.SCHEDULER), actor_name(Role.BUFFER)] == [
        "scorer-0",
        "scheduler",
        "buffer",
    ]
    with pytest.raises(ValueError, match="needs an index"):
        actor_name(Role.GENERATOR)
    with pytest.raises(ValueError, match="takes no index"):
        actor_name(Role.SCHEDULER, 0)
    with pytest.raises(ValueError):
        actor_name("generatr", 0)


def test_actor_options_local_and_cluster():
    local = load_config(PROJECT_ROOT / "configs/tiny_cpu.yaml")
    opts = actor_options(Role.GENERATOR, local, 1)
    assert opts["name"] == "generator-1" and opts["namespace"] == local.cluster.namespace
    assert opts["num_cpus"] == local.generator.num_cpus and opts["num_gpus"] == 0
    assert "resources" not in opts  # no custom resources on a local Ray
    assert "lifetime" not in opts  # actors belong to the job

    gpu = load_config(PROJECT_ROOT / "configs/qwen2.5-math-7b.yaml")
    assert gpu.cluster.use_role_resources
    for role, section, index in [
        (Role.GENERATOR, gpu.generator, 0),
        (Role.LEARNER, gpu.learner, 7),
        (Role.INTERPRETER, gpu.interpreter, 3),
        (Role.SCORER, gpu.scorer, 0),
        (Role.SCHEDULER, gpu.scheduler, None),
        (Role.BUFFER, gpu.buffer, None),
    ]:
        opts = actor_options(role, gpu, index)
        assert opts["num_cpus"] == section.num_cpus
        assert opts["num_gpus"] == getattr(section, "num_gpus", 0.0)
        assert opts["resources"] == {cluster.ROLE_RESOURCE[role]: cluster.ROLE_RESOURCE_UNIT}
        assert opts["max_concurrency"] >= 1
    assert actor_options(Role.LEARNER, gpu, 7)["name"] == "learner-rank-7"
    assert actor_options(Role.GENERATOR, gpu, 0)["max_concurrency"] >= gpu.generator.max_inflight_trajectories


def test_fake_cluster_config_mirrors_the_yaml(prepared):
    fake = cluster.fake_cluster_config(prepared, "127.0.0.1:1234", max_workers_per_type=2)
    assert set(fake["available_node_types"]) == set(prepared["available_node_types"])
    for name, spec in fake["available_node_types"].items():
        labels = {k: v for k, v in spec["resources"].items() if k != "CPU"}
        real = {k: v for k, v in prepared["available_node_types"][name]["resources"].items() if k not in ("CPU", "GPU")}
        assert labels == real and "GPU" not in spec["resources"]
    assert fake["provider"]["type"] == "fake_multinode" and fake["provider"]["gcs_address"] == "127.0.0.1:1234"
    # The fake config is complete enough for Ray's own schema (the monitor reads it as is).
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(fake))
