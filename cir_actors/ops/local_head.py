"""A private Ray head on this machine (tests, local experiments), optionally with Ray's fake
multi-node autoscaler built from ray_cluster.yaml.

`LocalHead` runs `ray start --head --block` on loopback with free ports and its own temp dir, in a
new session, so that `stop()` ends exactly the processes it started and never another Ray of the
user's (`ray stop` would). `LocalHead.fake_cluster(check_cluster_yaml(), ...)` gives a head whose
autoscaler launches fake worker nodes of the YAML's node types (`cluster.fake_cluster_config`).
What runs where, and the YAML's checks, are `ops/cluster.py`'s.

`connect_ray(cfg)` is how a driver (train, demo, bench) gets its Ray, deliberately: it joins a
cluster only when asked (cluster.address, or RAY_ADDRESS as under `ray job submit`), and otherwise
starts a private local instance, even when a head started by `ray start --head` is recorded on the
machine (Ray would silently join that one, and then refuse the driver's `num_cpus`). It says which
in one log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from cir_actors.config import Config
from cir_actors.ops.cluster import FAKE_HEAD_NODE_TYPE, fake_cluster_config

log = logging.getLogger(__name__)

def connect_ray(cfg: Config) -> str:
    """Join the cluster named by cluster.address or RAY_ADDRESS, else start a private local Ray whose
    logical CPUs leave room for the fractional controller actors. Returns "joined" or "private"."""
    import ray
    from ray._private.utils import read_ray_address

    if ray.is_initialized():
        return "joined" if _joining(cfg) else "private"
    if _joining(cfg):
        address = cfg.cluster.address or os.environ["RAY_ADDRESS"]
        source = "cluster.address" if cfg.cluster.address else "RAY_ADDRESS"
        log.info("Ray: joining the cluster at %s (%s)", address, source)
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=True)
        return "joined"
    num_cpus = max(os.cpu_count() or 2, 4)
    recorded = read_ray_address()  # what `ray start --head` left for ray.init() to auto-join
    log.info(
        "Ray: starting a private local instance (%d logical CPUs)%s", num_cpus,
        f"; not joining the Ray cluster running at {recorded} (set cluster.address=auto or RAY_ADDRESS "
        "to run on it)" if recorded else "",
    )
    ray.init(address="local", num_cpus=num_cpus, namespace=cfg.cluster.namespace, log_to_driver=True)
    return "private"


def _joining(cfg: Config) -> bool:
    return bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A Ray head on this machine, on loopback, with free ports and its own temp dir.

    Started as `ray start --head --block` in a new session, so that `stop()` ends exactly the
    processes it started (the head's and, with the fake provider, its worker nodes'), never any
    other Ray on the machine: `ray stop` (and `ray.cluster_utils.AutoscalingCluster`, which runs
    `ray stop --force`) would end every Ray process of the user. The project venv's bin directory
    goes first on PATH: a job's entrypoint `python ...` runs with the head's environment, and must
    find the venv's python. Auth is off (RAY_AUTH_MODE=disabled: loopback only) unless `env` says otherwise.
    """

    def __init__(
        self,
        *,
        num_cpus: float = 2,
        resources: dict[str, float] | None = None,
        autoscaling_config: dict[str, Any] | None = None,
        dashboard: bool = False,
        env: dict[str, str] | None = None,
        temp_dir: str | Path | None = None,
    ):
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.autoscaling_config = autoscaling_config
        self.dashboard = dashboard
        self.extra_env = env or {}
        self.port = free_port()
        # Always our own: even with the dashboard off, `ray start` binds its default 8265 (a head
        # process runs regardless), which another Ray on the machine may hold.
        self.dashboard_port = free_port()
        self.temp_dir: Path | None = None
        self._given_temp_dir = Path(temp_dir) if temp_dir is not None else None  # else a fresh one under /tmp
        self.proc: subprocess.Popen | None = None
        self.session_id: int | None = None  # the `ray start` pid; every process of this head carries it
        self._log: Any = None

    @classmethod
    def fake_cluster(cls, prepared: dict[str, Any], **fake_options: Any) -> LocalHead:
        """A head that runs the autoscaler on Ray's fake multi-node provider for the node types of a
        prepared cluster YAML (`check_cluster_yaml`); see `fake_cluster_config` for the options."""
        head = cls()
        head.autoscaling_config = fake_cluster_config(prepared, head.address, **fake_options)
        head_type = head.autoscaling_config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]
        head.num_cpus = head_type["CPU"]
        head.resources = {k: v for k, v in head_type.items() if k != "CPU"}
        return head

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)`."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / job submission address for `ray job submit --address ...`."""
        if not self.dashboard:
            raise RuntimeError("this LocalHead was started without a dashboard")
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment the head runs with (and a client talking to it should use)."""
        bin_dir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        if self.autoscaling_config is not None:
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 180.0) -> LocalHead:
        # Short path: Ray's unix sockets live under the temp dir and have a ~107-byte limit.
        if self._given_temp_dir is not None:
            self.temp_dir = self._given_temp_dir
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="cirh", dir="/tmp"))
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
        ]
        if self.resources:
            cmd.append("--resources=" + json.dumps(self.resources))
        cmd += [f"--include-dashboard={str(self.dashboard).lower()}", f"--dashboard-port={self.dashboard_port}"]
        if self.dashboard:
            cmd.append("--dashboard-host=127.0.0.1")
        if self.autoscaling_config is not None:
            cfg_path = self.temp_dir / "autoscaling.json"
            cfg_path.write_text(json.dumps(self.autoscaling_config))
            cmd.append(f"--autoscaling-config={cfg_path}")
        self._log = open(self.temp_dir / "head.log", "w")  # noqa: SIM115 (the child writes to it until stop)
        self.proc = subprocess.Popen(
            cmd, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.session_id = self.proc.pid
        deadline = time.monotonic() + timeout_s
        ready = self.temp_dir / "ray_current_cluster"  # written by `ray start` once the head is up
        while not ready.exists() or (self.dashboard and not self._dashboard_up()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.temp_dir / "head.log").read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"local Ray head did not start: {tail}")
            time.sleep(0.5)
        return self

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:  # 401/403 under token authentication: it is up
            # Anything else is another server on the port (one picked free can be taken before the
            # dashboard binds it: the likeliest cause of a CI failure on 2026-12-07).
            return e.code in (401, 403)
        except OSError:
            return False

    def pids(self) -> list[int]:
        """Every live process of this head's session (the head, its services, fake worker nodes)."""
        import psutil

        if self.session_id is None:
            return []
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.session_id:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM the `ray start --block` process (it drains and stops its node), then SIGKILL
        whatever of this session is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.25)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        # One retry: on a loaded 2-core machine a head's GCS can miss its first start-up deadline
        # ("Failed to get node info: Deadline Exceeded"); a second start (same ports: an autoscaling
        # config names the GCS address) succeeds.
        try:
            return self.start()
        except RuntimeError as first:
            log.warning("local Ray head did not start (%s); retrying once", str(first)[-200:])
            return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
