"""Where each role runs on a Ray cluster: role resources, actor names, and the cluster YAML's checks.

The one source of truth for
- the custom node resources that place each role (`ROLE_RESOURCE`): ray_cluster.yaml's node types
  provide exactly these names, and actors built with `actor_options(role, cfg, index)` ask for them
  when `cluster.use_role_resources` is on, so the autoscaler brings up the right node type;
- actor names (`generator-0`, `interpreter-2`, `learner-rank-1`, `scorer-0`, `scheduler`, `buffer`),
  which is what the dashboard and `ray list actors` show;
- the offline validation of ray_cluster.yaml (`check_cluster_yaml`: Ray's own schema plus what the
  schema lets through) and its translation into Ray's fake multi-node provider for tests
  (`fake_cluster_config`; `local_head.LocalHead` runs it).

A role resource is a placement label, not a capacity: a node type carries `<name>: 1` and each
actor asks for `ROLE_RESOURCE_UNIT` (1/100) of it; how many actors fit on a node is decided by CPUs
and GPUs. This module starts nothing and never talks to a cloud.

    python -m cir_actors.ops.cluster check [ray_cluster.yaml] [--config configs/X.yaml]   # before `ray up`
"""

from __future__ import annotations

import copy
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from cir_actors.config import Config

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = PROJECT_ROOT / "ray_cluster.yaml"
FAKE_HEAD_NODE_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node.node_provider


class Role(StrEnum):
    """An actor role of the system (one file per role in cir_actors/)."""

    GENERATOR = "generator"
    INTERPRETER = "interpreter"
    LEARNER = "learner"
    SCORER = "scorer"
    SCHEDULER = "scheduler"
    BUFFER = "buffer"


# Custom node resource per role. Scheduler and buffer hold the run's state and must outlive any
# worker node, so they live on the head (which the autoscaler never removes); the scorers are light
# CPU work (math-verify) and sit beside them, so a scorer never keeps a GPU node alive.
ROLE_RESOURCE: dict[Role, str] = {
    Role.GENERATOR: "generator",
    Role.LEARNER: "learner",
    Role.INTERPRETER: "interpreter",
    Role.SCORER: "head",
    Role.SCHEDULER: "head",
    Role.BUFFER: "head",
}
ROLE_RESOURCE_UNIT = 0.01
"""What one actor asks of its role resource (a node type provides 1: a label, capacity is CPU/GPU)."""

# Roles with one actor per index; the others are singletons.
INDEXED_ROLES = {Role.GENERATOR, Role.INTERPRETER, Role.LEARNER, Role.SCORER}

# Concurrent calls an actor accepts. Generators and interpreter pools are async actors serving many
# trajectories at once (Ray's own default for async actors is 1000; stated here so that control calls
# such as update_weights are never queued behind a full load). Scorers run verdicts in threads
# while their worker processes do the work. Scheduler and buffer answer many small calls, some of
# which wait (admission, batch assembly). Learner ranks run one collective step at a time.
ROLE_CONCURRENCY: dict[Role, int] = {
    Role.GENERATOR: 1000,
    Role.INTERPRETER: 1000,
    Role.SCORER: 16,
    Role.SCHEDULER: 64,
    Role.BUFFER: 64,
    Role.LEARNER: 1,
}


class ClusterConfigError(ValueError):
    """A problem in a cluster YAML, phrased for the user in one sentence."""


def resource_names() -> set[str]:
    """Every custom resource some role asks for (what the cluster YAML must provide)."""
    return set(ROLE_RESOURCE.values())


def actor_name(role: Role | str, index: int | None = None) -> str:
    """`generator-0`, `interpreter-2`, `learner-rank-1`, `scorer-0`, `scheduler`, `buffer`."""
    role = Role(role)
    if role in INDEXED_ROLES:
        if index is None or index < 0:
            raise ValueError(f"role '{role}' needs an index >= 0 for its actor name, got {index}")
        return f"learner-rank-{index}" if role is Role.LEARNER else f"{role}-{index}"
    if index is not None:
        raise ValueError(f"role '{role}' is a single actor and takes no index, got {index}")
    return str(role)


def role_resources(role: Role | str, cfg: Config) -> dict[str, float]:
    """What one actor of `role` needs, in Ray's resource vocabulary (CPU, GPU, custom label).

    Also what a placement-group bundle for the role holds (e.g. the learner ranks'
    `placement_group([role_resources(Role.LEARNER, cfg)] * n)`).
    """
    role = Role(role)
    section = {
        Role.GENERATOR: cfg.generator,
        Role.INTERPRETER: cfg.interpreter,
        Role.LEARNER: cfg.learner,
        Role.SCORER: cfg.scorer,
        Role.SCHEDULER: cfg.scheduler,
        Role.BUFFER: cfg.buffer,
    }[role]
    res: dict[str, float] = {"CPU": float(section.num_cpus)}
    gpus = float(getattr(section, "num_gpus", 0.0))
    if gpus:
        res["GPU"] = gpus
    if cfg.cluster.use_role_resources:
        res[ROLE_RESOURCE[role]] = ROLE_RESOURCE_UNIT
    return res


def actor_options(role: Role | str, cfg: Config, index: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `ray.remote(Cls).options(**actor_options(role, cfg, index))`.

    Name and namespace make the actor findable (`ray.get_actor(name, namespace=...)`) and readable in
    the dashboard. Actors are not detached: they belong to the driver (the job), so a failed or
    stopped job frees its nodes; a restart resumes from the run's checkpoint, not from live actors.
    """
    role = Role(role)
    res = role_resources(role, cfg)
    opts: dict[str, Any] = {
        "name": actor_name(role, index),
        "namespace": cfg.cluster.namespace,
        "num_cpus": res.pop("CPU"),
        "num_gpus": res.pop("GPU", 0.0),
        "max_concurrency": ROLE_CONCURRENCY[role],
    }
    if res:
        opts["resources"] = res
    from cir_actors.control.failures import restart_options

    opts.update(restart_options(role, cfg))  # the failure policy of the role (cir_actors/control/failures.py)
    return opts


# ---------------------------------------------------------------------------------------------
# ray_cluster.yaml: offline validation


def load_cluster_yaml(path: str | Path = CLUSTER_YAML) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"cluster file '{p}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _schema_error(e: Exception, source: str) -> str:
    import jsonschema

    if isinstance(e, jsonschema.ValidationError):
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        return f"{source}: '{where}': {e.message}"
    return f"{source}: {e}"


def check_cluster_yaml(path: str | Path = CLUSTER_YAML) -> dict[str, Any]:
    """Validate a cluster YAML offline; return Ray's prepared config. Raises ClusterConfigError.

    Ray's own checks (`prepare_config` fills the provider's defaults, `validate_config` applies
    the JSON schema; `ray up` has no dry run), then what the schema lets through: every node type
    has min_workers <= max_workers, an instance type and integer resources; every role resource the
    code asks for is provided by some node type and no node type carries an unknown one; GPU roles
    land on node types with GPUs; the head carries the head-side roles' resource.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    source = str(path)
    raw = load_cluster_yaml(path)
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, KeyError, TypeError, AssertionError, RuntimeError,
            NotImplementedError) as e:
        # Ray's own checks of the user's file; anything else is a bug and propagates.
        raise ClusterConfigError(_schema_error(e, source)) from None

    types: dict[str, Any] = prepared["available_node_types"]
    head = prepared["head_node_type"]
    for name, spec in types.items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers", 0)
        if lo > hi:
            raise ClusterConfigError(f"{source}: node type '{name}' has min_workers {lo} > max_workers {hi}")
        if prepared["provider"].get("type") == "aws" and not spec["node_config"].get("InstanceType"):
            raise ClusterConfigError(f"{source}: node type '{name}' has no node_config.InstanceType")
        if name != head and hi < 1:
            raise ClusterConfigError(f"{source}: worker node type '{name}' has max_workers {hi}; it can never start")
    provided = {r for spec in types.values() for r in spec["resources"] if r not in ("CPU", "GPU", "memory")}
    missing = resource_names() - provided
    if missing:
        raise ClusterConfigError(
            f"{source}: no node type provides the role resource(s) {sorted(missing)} that cir_actors/ops/cluster.py asks for"
        )
    unknown = provided - resource_names()
    if unknown:
        raise ClusterConfigError(
            f"{source}: node resource(s) {sorted(unknown)} are not role resources of cir_actors/ops/cluster.py "
            f"(expected only {sorted(resource_names())})"
        )
    if ROLE_RESOURCE[Role.SCHEDULER] not in types[head]["resources"]:
        raise ClusterConfigError(
            f"{source}: head node type '{head}' must provide '{ROLE_RESOURCE[Role.SCHEDULER]}' "
            "(scheduler, buffer and scorers live on the head)"
        )
    for role in (Role.GENERATOR, Role.LEARNER):
        hosts = [n for n, s in types.items() if ROLE_RESOURCE[role] in s["resources"]]
        if not any(types[n]["resources"].get("GPU", 0) >= 1 for n in hosts):
            raise ClusterConfigError(f"{source}: no node type providing '{ROLE_RESOURCE[role]}' has a GPU")
    return prepared


def check_fits(prepared: dict[str, Any], cfg: Config) -> None:
    """Every role's actor fits on some node type that provides its role resource (one sentence if not)."""
    types = prepared["available_node_types"]
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"use_role_resources": True})})
    for role in Role:
        need = role_resources(role, cfg)
        label = ROLE_RESOURCE[role]
        if not any(all(spec["resources"].get(k, 0) >= v for k, v in need.items()) for spec in types.values()):
            raise ClusterConfigError(
                f"no node type providing '{label}' fits one {role} actor {need} "
                f"(node types: { {n: s['resources'] for n, s in types.items()} })"
            )


# ---------------------------------------------------------------------------------------------
# The same cluster on Ray's fake multi-node provider (one machine, for tests)


def fake_cluster_config(
    prepared: dict[str, Any],
    gcs_address: str,
    *,
    max_workers_per_type: int = 2,
    idle_timeout_s: float = 6.0,
) -> dict[str, Any]:
    """ray_cluster.yaml's node types on Ray's fake multi-node provider: the same names and role
    resources, CPU 1 and no GPU per worker node, small maxima, a short idle timeout.

    Start it with `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=<file> ...` passing the
    head type's resources (`head_start_args`). The monitor reads this file as is (it does not fill
    defaults), so every key the autoscaler reads is present.
    """
    head = prepared["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in prepared["available_node_types"].items():
        labels = {k: v for k, v in spec["resources"].items() if k not in ("CPU", "GPU", "memory")}
        if name == head:
            # The fake provider tags its head with this fixed type name.
            types[FAKE_HEAD_NODE_TYPE] = {"resources": {"CPU": 2, **labels}, "node_config": {}, "min_workers": 0, "max_workers": 0}
        else:
            types[name] = {
                "resources": {"CPU": 1, **labels},
                "node_config": {},
                "min_workers": 0,
                "max_workers": min(max_workers_per_type, spec["max_workers"]),
            }
    return {
        "cluster_name": f"{prepared['cluster_name']}-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# ---------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    import argparse

    from cir_actors.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m cir_actors.ops.cluster", description="Validate a cluster YAML offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Ray's schema + the project's checks (no cloud access)")
    check.add_argument("cluster_yaml", nargs="?", default=str(CLUSTER_YAML))
    check.add_argument("--config", action="append", default=[], help="training config whose roles must fit (repeatable)")
    args = parser.parse_args(argv)
    try:
        prepared = check_cluster_yaml(args.cluster_yaml)
        for config_path in args.config:
            check_fits(prepared, load_config(config_path))
    except (ClusterConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, spec in prepared["available_node_types"].items():
        print(f"{name:24s} {spec['node_config'].get('InstanceType', '-'):16s} "
              f"workers {spec.get('min_workers', 0)}..{spec.get('max_workers', 0)}  {spec['resources']}")
    fits = f" ({', '.join(args.config)} fit{'s' if len(args.config) == 1 else ''})" if args.config else ""
    print(f"{args.cluster_yaml}: ok{fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
