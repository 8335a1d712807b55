"""The zygote: a warm, jailed Python that forks one sandboxed child per interpreter call.

Started by `InterpreterPool` as a subprocess and spoken to over one unix socket in msgpack frames.
Once, at start: new mount/network/IPC/UTS namespaces (when not root: inside a user namespace, and
the zygote goes on as pid 1 of a PID namespace of its own), a read-only filesystem jail holding only
this interpreter's files, the seccomp filter compiled to BPF, sympy and numpy imported, then a probe
call through the whole path. Per call, in the child: a new PID namespace (the code is pid 1, so
everything it starts dies with it), a new mount namespace with a size-limited tmpfs as working dir,
chroot into the jail, rlimits, an unprivileged uid of its own (without root: a user namespace of its
own, every capability dropped), cleared environment, no_new_privs, landlock and seccomp. The zygote
enforces the wall-clock deadline (SIGKILL to pid 1 tears down the namespace) and the output bound,
reaps, and replies.

Not here: the supervisor side, result formatting (`sandbox/pool.py`), the child's side of each call
(`sandbox/child.py`), and the syscalls (`sandbox/layers.py`).
Every frame from a child is untrusted input: sizes are capped and fields type-checked.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from cir_actors.sandbox import layers as L
from cir_actors.sandbox.child import CHILD_ENV, MAX_ERROR_CHARS, WORKDIR, run_child

LAYERS = ("namespaces", "filesystem_jail", "pid_namespace", "private_workdir", "rlimits", "unprivileged_uid",
          "cleared_env", "no_new_privs", "landlock", "seccomp")
MAX_CHILD_FRAME = 1 << 20
SESSION_CPU_BLOCKS = 8


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
    cmd_w: int
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
        self.ready: collections.deque[Child] = collections.deque()
        self.prefork = cfg["max_workers"]
        self.reserve = cfg["max_workers"]  # slots kept for children still being torn down
        self.num_slots = 2 * cfg["max_workers"] + cfg["max_sessions"] + 16
        self.free_slots = list(range(self.num_slots))[::-1]
        self.probe_result: dict | None = None

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
                L.enter_user_namespace(os.getuid(), os.getgid())
                L.unshare(flags)
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
            if not self.is_root:
                if not self.active["namespaces"]:
                    raise RuntimeError("needs the user namespace")
                self._become_init_of_own_pid_namespace()
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
        gc.collect()
        gc.freeze()  # children's collections then leave the shared pages alone (fewer copy-on-write faults)

    def _become_init_of_own_pid_namespace(self) -> None:
        """Without root: go on as pid 1 of a new PID namespace that the zygote's user namespace owns.
        After forking each child into a namespace of its own, `_spawn` moves back into the zygote's
        (setns), which needs CAP_SYS_ADMIN over it: over the host's, only root has that. The process
        the supervisor started stays behind only to wait, and exits with the zygote's status; the
        zygote dies with it (PR_SET_PDEATHSIG), and everything it forked dies with the zygote."""
        L.unshare(L.CLONE_NEWPID)
        pid = os.fork()
        if pid:
            self.ctl.close()  # the supervisor must see the zygote's end of the socket close with it
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        # Had the waiter died before this line, the zygote would still end: at the socket's close.
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)

    def probe(self) -> str | None:
        """Run one call through every active layer; None when it behaved, else what went wrong."""
        code = "import os, sympy\nprint(os.getpid(), os.getuid(), sympy.Integer(6) * 7)"
        self.submit(Call(-1, code, 30.0, None))
        deadline = time.monotonic() + 30
        while self.running and time.monotonic() < deadline:
            self.step(0.5)
        got = self.probe_result
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
            if sess.busy:  # blocks of one session run in order
                sess.waiting.append(call)
                return
            sess.busy = True
        self.pending.append(call)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.pending and self.running < self.cfg["max_workers"]:
            sess = self.sessions.get(self.pending[0].session) if self.pending[0].session is not None else None
            fresh = not (sess is not None and sess.child is not None and not sess.child.exited)
            if not fresh:
                child, replay = sess.child, []
            elif self.ready:
                child, replay = self.ready.popleft(), list(sess.history) if sess is not None else []
            elif self.free_slots:
                child, replay = self._spawn(), list(sess.history) if sess is not None else []
            else:
                return
            call = self.pending.popleft()
            self.running += 1
            call.started = time.monotonic()
            call.deadline = call.started + call.timeout_s * (1 + len(replay))
            child.call = call
            if sess is not None and sess.child is not child:
                child.session = sess.name
                sess.child = child
                self._cap_sessions()
            msg = {"code": call.code, "replay": replay, "keep": sess is not None}
            if fresh:
                # RLIMIT_CPU cannot be raised later without CAP_SYS_RESOURCE, so a session child gets
                # its whole budget up front: its replayed blocks plus SESSION_CPU_BLOCKS more. Past
                # that it is killed and the session replays in a fresh child.
                blocks = 1 if sess is None else 1 + len(replay) + SESSION_CPU_BLOCKS
                msg["cpu_s"] = self.cfg["cpu_time_s"] * blocks
            try:
                os.write(child.cmd_w, L.pack_frame(msg))
            except OSError:  # the child died under us: its reaping finishes the call
                self._kill(child, None)

    def _refill(self, at_most: int) -> None:
        """Keep `prefork` children forked, jailed and waiting, so a call pays for none of that."""
        for _ in range(at_most):
            if len(self.ready) >= self.prefork or len(self.free_slots) <= self.reserve:
                return
            self.ready.append(self._spawn())

    def _spawn(self) -> Child:
        slot = self.free_slots.pop()
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        cmd_r, cmd_w = os.pipe()
        if self.active["pid_namespace"]:
            L.unshare(L.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            stage = {"res": res_w}
            try:
                run_child(self, slot, (out_w, res_w, cmd_r), stage)
            except BaseException as e:  # noqa: BLE001 - a layer could not be applied: no code runs
                with contextlib.suppress(BaseException):
                    os.write(stage["res"], L.pack_frame({"ok": False, "error": f"SandboxError: {e}"}))
            finally:
                os._exit(70)
        if self.active["pid_namespace"]:
            L.setns(self.own_pidns, L.CLONE_NEWPID)
        for fd in (out_w, res_w, cmd_r):
            os.close(fd)
        for fd in (out_r, res_r):
            os.set_blocking(fd, False)
        child = Child(pid, slot, out_r, res_r, cmd_w, None)
        self.children[pid] = child
        for fd in (out_r, res_r):
            self.by_fd[fd] = child
            self.sel.register(fd, selectors.EVENT_READ)
        return child

    def _cap_sessions(self) -> None:
        """At most max_sessions live session children (least recently used idle ones go; their
        history stays for a replay) and at most 8x that many histories."""
        live = [s for s in self.sessions.values() if s.child is not None and not s.child.exited]
        for sess in live[: max(0, len(live) - self.cfg["max_sessions"])]:
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
            with contextlib.suppress(OSError):
                fn(child.pid, signal.SIGKILL)

    def close_session(self, name: str) -> None:
        sess = self.sessions.pop(name, None)
        if sess is not None and sess.child is not None:
            self._kill(sess.child, None)
            sess.child.session = None

    # -- events
    def _on_output(self, child: Child, fd: int) -> None:
        limit = self.cfg["max_output_bytes"]
        while True:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                if fd in self.sel.get_map():
                    self.sel.unregister(fd)
                return
            if fd == child.res_r:
                try:
                    frames = child.reader.feed(data)
                except Exception:  # noqa: BLE001 - a forged or oversized frame is the code's own failure
                    frames = [{"ok": False, "error": "SandboxProtocolError"}]
                if frames and child.call is not None and child.call.result is None:
                    child.call.result = frames[0]
                    self._on_output(child, child.out_r)  # everything printed before the frame
                    self._finish(child)
            elif child.call is not None:
                room = limit - len(child.call.stdout)
                child.call.stdout += data[: max(room, 0)]
                if len(data) > room:
                    child.call.truncated = True
                    self._kill(child, "OutputLimitExceeded")

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
            for fd in (child.res_r, child.out_r):
                if fd in self.sel.get_map():
                    self._on_output(child, fd)
            if child.call is not None:
                self._finish(child)
            for fd in (child.out_r, child.res_r, child.cmd_w):
                self.by_fd.pop(fd, None)
                if fd in self.sel.get_map():
                    self.sel.unregister(fd)
                os.close(fd)
            self.free_slots.append(child.slot)
            if child in self.ready:
                self.ready.remove(child)
            sess = self.sessions.get(child.session) if child.session is not None else None
            if sess is not None and sess.child is child:
                sess.child = None

    def _finish(self, child: Child) -> None:
        call, child.call = child.call, None
        assert call is not None
        self.running -= 1
        child.last_used = time.monotonic()
        frame, status = call.result, child.status
        ok, error, killed_by = False, None, None
        if status is not None and os.WIFSIGNALED(status):
            killed_by = os.WTERMSIG(status)
        if call.reason is not None:
            error = call.reason
        elif isinstance(frame, dict) and isinstance(frame.get("ok"), bool):
            ok = frame["ok"]
            error = None if ok else str(frame.get("error") or "Error")[: MAX_ERROR_CHARS + 3]
        elif killed_by is not None:
            error = f"Killed by signal {killed_by}"
        elif status is not None and os.WEXITSTATUS(status) == 0:
            ok = True
        else:
            error = f"Exited with status {os.WEXITSTATUS(status) if status is not None else '?'}"
        reply = {"op": "result", "id": call.call_id, "ok": ok, "stdout": call.stdout.decode("utf-8", "replace"),
                 "error": error, "timed_out": call.reason == "Timeout", "truncated": call.truncated,
                 "killed_by": killed_by, "duration_s": time.monotonic() - call.started}
        if child.session is None or call.reason is not None:
            self._kill(child, None)  # done (or broken): the pid namespace and all it started go now
        sess = self.sessions.get(call.session) if call.session is not None else None
        if sess is not None:
            if frame is not None and call.reason is None:
                sess.history.append(call.code)
            sess.busy = False
            if sess.waiting:
                sess.busy = True
                self.pending.append(sess.waiting.popleft())
        if call.call_id == -1:
            self.probe_result = reply
        else:
            self.ctl.sendall(L.pack_frame(reply))
        self._dispatch()

    def _expire(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.call is not None and now >= child.call.deadline:
                self._kill(child, "Timeout")
            elif (child.call is None and child.session is not None and not child.exited
                  and now - child.last_used > self.cfg["session_idle_s"]):
                self._kill(child, None)

    def step(self, max_wait: float) -> bool:
        """One turn of the loop; False when the supervisor has gone."""
        events = self.sel.select(0)
        if not events and len(self.ready) < self.prefork:
            # Forking blocks this loop for a few ms: do it only when nothing is waiting to be handled.
            self._refill(1)
            events = self.sel.select(0)
        if not events:
            deadlines = [c.call.deadline for c in self.children.values() if c.call is not None]
            refill_soon = len(self.ready) < self.prefork and len(self.free_slots) > self.reserve
            wait = 0.0 if refill_soon else max(0.0, min([max_wait] + [d - time.monotonic() for d in deadlines]))
            events = self.sel.select(wait)
        for key, _ in events:
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
                  "uid_range": [self.uid_base, self.uid_base + self.num_slots] if self.is_root else None,
                  "landlock_abi": self.landlock_abi, "jail_paths": self.ro_paths, "zygote_pid": _host_pid(),
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


def _host_pid() -> int:
    """This process's pid as the supervisor sees it (the zygote is pid 1 of its own PID namespace
    when not root): the first of /proc's NSpid, /proc being the host's."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("NSpid:"))


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
