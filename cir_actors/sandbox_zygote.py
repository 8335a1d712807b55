"""The zygote: a warm, jailed Python that forks one sandboxed child per interpreter call.

Started by `InterpreterPool` as a subprocess and spoken to over one unix socket in msgpack frames.
Once, at start: new mount/network/IPC/UTS namespaces (plus a user namespace when not root), a
read-only filesystem jail holding only this interpreter's files, the seccomp filter compiled to BPF,
sympy and numpy imported, then a probe call through the whole path. Per call, in the child: a new
PID namespace (the code is pid 1, so everything it starts dies with it), a new mount namespace with
a size-limited tmpfs as working dir, chroot into the jail, rlimits, an unprivileged uid of its own,
cleared environment, no_new_privs, landlock and seccomp. The zygote enforces the wall-clock deadline
(SIGKILL to pid 1 tears down the namespace) and the output bound, reaps, and replies.

Not here: the supervisor side, result formatting (`interpreter.py`), and the syscalls (`sandbox_layers.py`).
Every frame from a child is untrusted input: sizes are capped and fields type-checked.
"""

from __future__ import annotations

import builtins
import collections
import errno
import fcntl
import os
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from cir_actors import sandbox_layers as L

LAYERS = ("namespaces", "filesystem_jail", "pid_namespace", "private_workdir", "rlimits", "unprivileged_uid",
          "cleared_env", "no_new_privs", "landlock", "seccomp")
WORKDIR = "/sandbox"  # inside the jail; must not be a prefix of any jailed host path
CHILD_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_CHILD_FRAME = 1 << 20
MAX_ERROR_CHARS = 2000
WORKDIR_MB = 64


# ---- the child: runs inside every layer ------------------------------------------------------

def _run_block(code: str, scope: dict) -> tuple[bool, str | None]:
    try:
        exec(compile(code, "<code>", "exec"), scope)
        ok, err = True, None
    except SystemExit as e:
        ok = e.code in (None, 0)
        err = None if ok else f"SystemExit: {e.code}"
    except BaseException as e:  # noqa: BLE001 - everything the code raises is a result
        ok, err = False, traceback.format_exception_only(type(e), e)[-1].strip()
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    if err is not None and len(err) > MAX_ERROR_CHARS:
        err = err[: MAX_ERROR_CHARS // 2] + "..." + err[-MAX_ERROR_CHARS // 2 :]
    return ok, err


def _child(z: Zygote, slot: int, code: str, replay: list[str], fds: tuple[int, int, int | None],
           stage: dict) -> None:
    """Never returns. fds: (stdout pipe, result pipe, command pipe of a session or None); stage["res"]
    is where the result pipe currently is (so a failure to apply a layer can be reported)."""
    out_w, res_w, cmd_r = fds
    on = z.active
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()
    uid = gid = z.uid_base + slot if z.is_root else 0
    devnull = os.open("/dev/null", os.O_RDWR)
    # descriptors: 0 /dev/null, 1 stdout pipe, 2 /dev/null, 3 result pipe, 4 commands, 5 saved stdout
    high = {name: fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for name, fd in
            (("null", devnull), ("out", out_w), ("res", res_w), ("cmd", cmd_r)) if fd is not None}
    for name, dst in (("null", 0), ("out", 1), ("null", 2), ("res", 3), ("cmd", 4), ("out", 5)):
        if name in high:
            os.dup2(high[name], dst)
        elif _is_open(dst):
            os.close(dst)
    stage["res"] = 3
    os.closerange(6, 1 << 16)
    if on["private_workdir"]:
        if on["filesystem_jail"]:
            L.unshare(L.CLONE_NEWNS)
            L.mount("cir-work", z.jail + WORKDIR, "tmpfs", L.MS_NOSUID | L.MS_NODEV,
                    f"size={WORKDIR_MB}m,mode=0700,uid={uid},gid={gid}")
        else:
            work = tempfile.mkdtemp(dir=z.scratch)
            os.chown(work, uid, gid)
            os.chdir(work)
    if on["filesystem_jail"]:
        os.chroot(z.jail)
        os.chdir(WORKDIR)
    if on["rlimits"]:
        cfg = z.cfg
        lim = [(resource.RLIMIT_AS, z.base_vm_bytes + (cfg["memory_mb"] << 20)),
               (resource.RLIMIT_CPU, cfg["cpu_time_s"]), (resource.RLIMIT_FSIZE, WORKDIR_MB << 20),
               (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, cfg["max_processes"]),
               (resource.RLIMIT_CORE, 0)]
        for which, value in lim:
            resource.setrlimit(which, (value, value))
    if on["unprivileged_uid"] and z.is_root:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if on["cleared_env"]:
        os.environ.clear()
        os.environ.update(CHILD_ENV)
    if on["no_new_privs"] or on["landlock"] or on["seccomp"]:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    if on["landlock"]:
        dev = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
        work = WORKDIR if on["filesystem_jail"] else os.getcwd()
        L.landlock_restrict(z.landlock_abi, z.ro_paths + dev, [work, "/dev/null"])
    if on["seccomp"]:
        L.load_seccomp(z.seccomp_bpf)
    import io

    # Unbuffered stdout: output printed before os._exit or a segfault is not lost.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    scope: dict = {"__name__": "__main__", "__builtins__": builtins}
    if replay:  # a lost session's earlier blocks, output discarded
        os.dup2(2, 1)
        for block in replay:
            _run_block(block, scope)
        os.dup2(5, 1)
    reader = L.FrameReader()
    while True:
        ok, err = _run_block(code, scope)
        os.write(3, L.pack_frame({"ok": ok, "error": err}))
        if cmd_r is None:
            os._exit(0)
        code = None
        while code is None:
            data = os.read(4, 65536)
            if not data:
                os._exit(0)
            for frame in reader.feed(data):
                code = frame["code"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ---- the zygote: bookkeeping and the event loop ----------------------------------------------

@dataclass
class Call:
    call_id: int
    code: str
    timeout_s: float
    session: str | None
    started: float = 0.0
    deadline: float = 0.0
    stdout: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    reason: str | None = None  # "Timeout" / "OutputLimitExceeded" when the zygote killed the child
    result: dict | None = None  # the child's own frame


@dataclass
class Child:
    pid: int
    slot: int
    out_r: int
    res_r: int
    cmd_w: int | None
    session: str | None
    call: Call | None = None
    reader: L.FrameReader = field(default_factory=L.FrameReader)
    exited: bool = False
    status: int | None = None
    last_used: float = 0.0


@dataclass
class Session:
    name: str
    history: list[str] = field(default_factory=list)
    child: Child | None = None
    busy: bool = False
    waiting: collections.deque = field(default_factory=collections.deque)


class Zygote:
    def __init__(self, ctl: socket.socket, cfg: dict) -> None:
        self.ctl, self.cfg = ctl, cfg
        self.is_root = os.geteuid() == 0
        self.uid_base = 1_000_000 + (os.getpid() % 100_000) * 4096
        self.active = {name: False for name in LAYERS}
        self.problems: dict[str, str] = {}
        self.jail = ""
        self.scratch = cfg["scratch"]  # made and removed by the supervisor
        self.ro_paths = L.interpreter_paths()
        self.landlock_abi = 0
        self.seccomp_bpf = b""
        self.base_vm_bytes = 0
        self.own_pidns = -1
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}
        self.by_fd: dict[int, Child] = {}
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.pending: collections.deque[Call] = collections.deque()
        self.running = 0
        self.free_slots = list(range(cfg["max_workers"] + cfg["max_sessions"] + 8))[::-1]

    # -- start-up: apply what can be applied, remember why the rest failed
    def _try(self, layer: str, fn) -> None:
        try:
            fn()
            self.active[layer] = True
        except Exception as e:  # noqa: BLE001 - reported to the supervisor, which decides
            self.problems[layer] = f"{type(e).__name__}: {e}"

    def setup(self) -> None:
        flags = L.CLONE_NEWNS | L.CLONE_NEWNET | L.CLONE_NEWIPC | L.CLONE_NEWUTS

        def namespaces() -> None:
            if self.is_root:
                L.unshare(flags)
            else:  # a user namespace gives the capabilities the rest needs, over nothing of the host's
                uid, gid = os.getuid(), os.getgid()
                L.unshare(flags | L.CLONE_NEWUSER)
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)

        def jail() -> None:
            if not self.active["namespaces"]:
                raise RuntimeError("needs the private mount namespace")
            if any(p == WORKDIR or p.startswith(WORKDIR + "/") for p in self.ro_paths):
                raise RuntimeError(f"the interpreter lives under {WORKDIR}, the jail's working dir")
            self.jail = os.path.join(self.scratch, "jail")
            os.mkdir(self.jail)
            L.build_jail(self.jail, self.ro_paths, WORKDIR.lstrip("/"))

        def pidns() -> None:
            self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

        def landlock() -> None:
            self.landlock_abi = L.landlock_abi()
            if self.landlock_abi < 1:
                raise RuntimeError("the kernel has no landlock (CONFIG_SECURITY_LANDLOCK, lsm= boot list)")

        def seccomp() -> None:
            self.seccomp_bpf = L.compile_seccomp()

        def uid() -> None:  # as root: a uid of its own per child; else the user namespace's unmapped host uid
            if not self.is_root and not self.active["namespaces"]:
                raise RuntimeError("not root and no user namespace")

        self._try("namespaces", namespaces)
        self._try("filesystem_jail", jail)
        self._try("pid_namespace", pidns)
        self._try("landlock", landlock)
        self._try("seccomp", seccomp)
        self._try("unprivileged_uid", uid)
        for name in ("private_workdir", "rlimits", "cleared_env", "no_new_privs"):
            self.active[name] = True
        os.environ.clear()
        os.environ.update(CHILD_ENV)
        import numpy  # noqa: F401 - warm imports are the point of the zygote
        import sympy  # noqa: F401

        with open("/proc/self/status") as f:
            self.base_vm_bytes = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))

    def probe(self) -> str | None:
        """Run one call through every active layer; None when it behaved, else what went wrong."""
        code = "import os, sympy\nprint(os.getpid(), os.getuid(), sympy.Integer(6) * 7)"
        self.submit(Call(-1, code, 30.0, None))
        deadline = time.monotonic() + 30
        while self.running and time.monotonic() < deadline:
            self.step(0.5)
        got = getattr(self, "_probe_result", None)
        if not got or not got["ok"]:
            return f"probe call failed: {got}"
        pid, uid, value = got["stdout"].split()
        if self.active["pid_namespace"] and pid != "1":
            return f"probe ran as pid {pid}, not 1 of a fresh pid namespace"
        if self.active["unprivileged_uid"] and self.is_root and uid == "0":
            return "probe ran as root"
        return None if value == "42" else f"probe printed {got['stdout']!r}"

    # -- calls
    def submit(self, call: Call) -> None:
        if call.session is not None:
            sess = self.sessions.get(call.session) or Session(call.session)
            self.sessions[call.session] = sess
            self.sessions.move_to_end(call.session)
            if sess.busy:
                sess.waiting.append(call)
                return
            sess.busy = True
        self.pending.append(call)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.pending and self.running < self.cfg["max_workers"] and self.free_slots:
            call = self.pending.popleft()
            self.running += 1
            call.started = time.monotonic()
            sess = self.sessions.get(call.session) if call.session is not None else None
            if sess is not None and sess.child is not None and not sess.child.exited:
                child = sess.child
                child.call = call
                call.deadline = call.started + call.timeout_s
                self._raise_cpu_limit(child.pid)
                try:
                    os.write(child.cmd_w, L.pack_frame({"code": call.code}))
                except OSError:
                    self._kill(child, None)
                continue
            replay = list(sess.history) if sess is not None else []
            call.deadline = call.started + call.timeout_s * (1 + len(replay))
            child = self._spawn(call, replay)
            if sess is not None:
                self._cap_sessions()
                sess.child = child

    def _spawn(self, call: Call, replay: list[str]) -> Child:
        slot = self.free_slots.pop()
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        cmd_r, cmd_w = os.pipe() if call.session is not None else (None, None)
        if self.active["pid_namespace"]:
            L.unshare(L.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            stage = {"res": res_w}
            try:
                _child(self, slot, call.code, replay, (out_w, res_w, cmd_r), stage)
            except BaseException as e:  # noqa: BLE001 - a layer could not be applied: the code never runs
                try:
                    os.write(stage["res"], L.pack_frame({"ok": False, "error": f"SandboxError: {e}"}))
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(70)
        if self.active["pid_namespace"]:
            L.setns(self.own_pidns, L.CLONE_NEWPID)
        for fd in (out_w, res_w, cmd_r):
            if fd is not None:
                os.close(fd)
        for fd in (out_r, res_r):
            os.set_blocking(fd, False)
        child = Child(pid, slot, out_r, res_r, cmd_w, call.session, call)
        self.children[pid] = child
        for fd in (out_r, res_r):
            self.by_fd[fd] = child
            self.sel.register(fd, selectors.EVENT_READ)
        return child

    def _raise_cpu_limit(self, pid: int) -> None:
        """A session child's CPU limit is per block: the limit moves up by cpu_time_s from what it used."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) // os.sysconf("SC_CLK_TCK")
            lim = used + self.cfg["cpu_time_s"]
            resource.prlimit(pid, resource.RLIMIT_CPU, (lim, lim))
        except OSError:
            pass

    def _cap_sessions(self) -> None:
        live = [s for s in self.sessions.values() if s.child is not None and not s.child.exited]
        for sess in live[: max(0, len(live) - self.cfg["max_sessions"] + 1)]:
            if not sess.busy:
                self._kill(sess.child, None)
        extra = len(self.sessions) - 8 * self.cfg["max_sessions"]
        for name in list(self.sessions)[: max(0, extra)]:
            if not self.sessions[name].busy:
                self.close_session(name)

    def _kill(self, child: Child, reason: str | None) -> None:
        if child.call is not None and reason and child.call.reason is None:
            child.call.reason = reason
        for fn in (os.killpg, os.kill):
            try:
                fn(child.pid, signal.SIGKILL)
            except OSError:
                pass

    def close_session(self, name: str) -> None:
        sess = self.sessions.pop(name, None)
        if sess is not None and sess.child is not None:
            self._kill(sess.child, None)
            sess.child.session = None

    # -- the loop
    def _on_output(self, child: Child, fd: int) -> None:
        limit = self.cfg["max_output_bytes"]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                self.sel.unregister(fd)
                return
            if fd == child.res_r:
                try:
                    frames = child.reader.feed(data)
                except Exception:  # noqa: BLE001 - a forged or oversized frame
                    frames = [{"ok": False, "error": "SandboxProtocolError"}]
                for frame in frames:
                    if child.call is not None and child.call.result is None:
                        child.call.result = frame
                        if child.session is not None:
                            self._drain(child)
                            self._finish(child)
            elif child.call is not None:
                room = limit - len(child.call.stdout)
                child.call.stdout += data[: max(room, 0)]
                if len(data) > room:
                    child.call.truncated = True
                    self._kill(child, "OutputLimitExceeded")

    def _drain(self, child: Child) -> None:
        for fd in (child.out_r,):
            try:
                self._on_output(child, fd)
            except (OSError, KeyError, ValueError):
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.exited, child.status = True, status
            for fd in (child.out_r, child.res_r):
                self._on_output(child, fd) if fd in self.sel.get_map() else None
            if child.call is not None:
                self._finish(child)
            for fd in (child.out_r, child.res_r, child.cmd_w):
                if fd is not None:
                    self.by_fd.pop(fd, None)
                    if fd in self.sel.get_map():
                        self.sel.unregister(fd)
                    os.close(fd)
            self.free_slots.append(child.slot)
            sess = self.sessions.get(child.session) if child.session is not None else None
            if sess is not None and sess.child is child:
                sess.child = None
        # not reached

    def _finish(self, child: Child) -> None:
        call, child.call = child.call, None
        assert call is not None
        self.running -= 1
        child.last_used = time.monotonic()
        frame, status = call.result, child.status
        ok, error, killed_by = False, None, None
        if call.reason is not None:
            error = call.reason
        elif isinstance(frame, dict) and isinstance(frame.get("ok"), bool):
            ok = frame["ok"]
            error = None if ok else str(frame.get("error") or "Error")[: MAX_ERROR_CHARS + 3]
        elif status is not None and os.WIFSIGNALED(status):
            killed_by = os.WTERMSIG(status)
            error = f"Killed by signal {killed_by}"
        elif status is not None and os.WEXITSTATUS(status) == 0:
            ok = True
        else:
            error = f"Exited with status {os.WEXITSTATUS(status) if status is not None else '?'}"
        if call.reason is not None and status is not None and os.WIFSIGNALED(status):
            killed_by = os.WTERMSIG(status)
        reply = {"op": "result", "id": call.call_id, "ok": ok, "stdout": call.stdout.decode("utf-8", "replace"),
                 "error": error, "timed_out": call.reason == "Timeout", "truncated": call.truncated,
                 "killed_by": killed_by, "duration_s": time.monotonic() - call.started}
        if call.session is not None:
            sess = self.sessions.get(call.session)
            if sess is not None:
                if call.result is not None and call.reason is None:
                    sess.history.append(call.code)
                if call.reason is not None and child.session is not None:
                    self._kill(child, None)
                sess.busy = False
                if sess.waiting:
                    sess.busy = True
                    self.pending.append(sess.waiting.popleft())
        if call.call_id == -1:
            self._probe_result = reply
        else:
            self.ctl.sendall(L.pack_frame(reply))
        self._dispatch()

    def _expire(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.call is not None and now >= child.call.deadline:
                self._kill(child, "Timeout")
            elif child.call is None and child.session is not None and not child.exited:
                if now - child.last_used > self.cfg["session_idle_s"]:
                    self._kill(child, None)

    def step(self, max_wait: float) -> bool:
        """One turn of the loop; False when the supervisor has gone."""
        deadlines = [c.call.deadline for c in self.children.values() if c.call is not None]
        wait = max(0.0, min([max_wait] + [d - time.monotonic() for d in deadlines]))
        for key, _ in self.sel.select(wait):
            fd = key.fd
            if fd == self.wake_r:
                while True:
                    try:
                        if not os.read(fd, 4096):
                            break
                    except BlockingIOError:
                        break
                self._reap()
            elif fd == self.ctl.fileno():
                if not self._on_control():
                    return False
            elif fd in self.by_fd:
                self._on_output(self.by_fd[fd], fd)
        self._reap()
        self._expire()
        return True

    def _on_control(self) -> bool:
        try:
            data = self.ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        for msg in self.ctl_reader.feed(data):
            op = msg.get("op")
            if op == "run":
                self.submit(Call(msg["id"], msg["code"], float(msg["timeout_s"]), msg.get("session")))
            elif op == "close_session":
                self.close_session(msg["session"])
                self.ctl.sendall(L.pack_frame({"op": "closed", "id": msg["id"]}))
            elif op == "shutdown":
                return False
        return True

    def serve(self) -> None:
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.ctl_reader = L.FrameReader()
        off = [name for name, on in self.active.items() if not on]
        if off and not self.cfg["allow_weaker_isolation"]:
            detail = "; ".join(f"{name}: {self.problems.get(name, 'unavailable')}" for name in off)
            self.ctl.sendall(L.pack_frame({"op": "error", "message": f"cannot apply {detail}"}))
            return
        problem = self.probe()
        if problem is not None:
            self.ctl.sendall(L.pack_frame({"op": "error", "message": problem}))
            return
        report = {"layers": dict(self.active), "problems": self.problems, "root": self.is_root,
                  "landlock_abi": self.landlock_abi, "jail_paths": self.ro_paths, "zygote_pid": os.getpid(),
                  "scratch": self.scratch}
        self.ctl.sendall(L.pack_frame({"op": "ready", "report": report}))
        self.sel.register(self.ctl.fileno(), selectors.EVENT_READ)
        while self.step(1.0):
            pass

    def shutdown(self) -> None:
        for child in list(self.children.values()):
            self._kill(child, None)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)


def main(ctl_fd: int) -> None:
    """Entry point of the zygote process (see InterpreterPool._start)."""
    ctl = socket.socket(fileno=ctl_fd)
    reader = L.FrameReader()
    cfg = None
    while cfg is None:
        data = ctl.recv(65536)
        if not data:
            return
        frames = reader.feed(data)
        cfg = frames[0] if frames else None
    z = Zygote(ctl, cfg)
    z.setup()
    try:
        z.serve()
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise
    finally:
        z.shutdown()
