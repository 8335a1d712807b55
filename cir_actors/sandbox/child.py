"""The sandboxed child: what runs inside every layer, one fork of the zygote per interpreter call.

`run_child` applies the layers the zygote found working (a private tmpfs working dir, chroot into
the jail, rlimits, its own uid, a cleared environment, no_new_privs, landlock, seccomp), then runs
the blocks the zygote sends on its command pipe with `run_block` and reports each result as a
frame. It never returns: the process ends with the call (or the session). Everything in here runs
in the fork, so it uses only modules the zygote imported before it entered the jail.

Not here: the fork, the deadline, the output bound and reaping (`sandbox/zygote.py`), and the
syscalls (`sandbox/layers.py`).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import fcntl
import os
import resource
import signal
import sys
import tempfile
import traceback
from typing import Protocol

from cir_actors.sandbox import layers as L

WORKDIR = "/sandbox"  # inside the jail; must not be a prefix of any jailed host path
CHILD_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_ERROR_CHARS = 2000
WORKDIR_MB = 64

_BUILTINS = dict(builtins.__dict__)


class ChildHost(Protocol):
    """What a child needs from the zygote that forked it (the zygote is one; this module does not
    import it, so the zygote imports the child and not the other way round)."""

    active: dict[str, bool]  # layer name -> applied at start-up
    cfg: dict  # the interpreter config as the supervisor sent it (memory_mb, max_processes, ...)
    is_root: bool
    uid_base: int
    jail: str
    scratch: str
    ro_paths: list[str]
    landlock_abi: int
    seccomp_bpf: bytes
    base_vm_bytes: int


class _CountingStdout:
    """sys.stdout for the length of a block, counting what the block printed through it."""

    def __init__(self, inner) -> None:
        self._inner, self.chars = inner, 0

    def write(self, text):
        self.chars += len(text)
        return self._inner.write(text)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _split_last_expression(code: str):
    """(the block without its last statement, that statement as an eval-able expression) when the
    block parses and ends with a bare expression; None otherwise."""
    try:
        tree = ast.parse(code, "<code>", "exec")
    except SyntaxError:
        return None
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return None
    last = tree.body.pop()
    return compile(tree, "<code>", "exec"), compile(ast.Expression(last.value), "<code>", "eval")


def run_block(code: str, scope: dict, repl: bool = False) -> tuple[bool, str | None]:
    """exec one block; (ok, error line). Builtins the block replaced (print = None) are put back
    afterwards, so that reporting its result and the next block of a session still work.

    `repl` (interpreter.repl_last_expression, CIR's executor rule): when the block ends with a bare
    expression and printed nothing through sys.stdout, the expression's value is printed (str, as
    CIR; None is not shown, as in the Python REPL). The expression is evaluated once, as a plain
    exec would; CIR's executor re-runs the rest of the block first, which this does not copy."""
    raised: BaseException | None = None
    split = _split_last_expression(code) if repl else None
    counter = None
    try:
        if split is None:
            exec(compile(code, "<code>", "exec"), scope)  # noqa: S102 - running it is the point
        else:
            counter = sys.stdout = _CountingStdout(sys.stdout)
            exec(split[0], scope)  # noqa: S102
            value = eval(split[1], scope)
            if value is not None and counter.chars == 0 and sys.stdout is counter:
                counter.write(f"{value}\n")
    except BaseException as e:  # noqa: BLE001 - everything the code raises is a result
        raised = e
    if counter is not None and sys.stdout is counter:
        sys.stdout = counter._inner
    builtins.__dict__.update(_BUILTINS)
    if raised is None:
        ok, err = True, None
    elif isinstance(raised, SystemExit):
        ok = raised.code in (None, 0)
        err = None if ok else f"SystemExit: {raised.code}"
    else:
        try:
            ok, err = False, traceback.format_exception_only(type(raised), raised)[-1].strip()
        except BaseException:  # noqa: BLE001 - an exception whose __str__ fails
            ok, err = False, type(raised).__name__
    with contextlib.suppress(BaseException):  # the code may have replaced or closed stdout
        sys.stdout.flush()
    if err is not None and len(err) > MAX_ERROR_CHARS:
        err = err[: MAX_ERROR_CHARS // 2] + "..." + err[-MAX_ERROR_CHARS // 2 :]
    return ok, err


def run_child(z: ChildHost, slot: int, fds: tuple[int, int, int], stage: dict) -> None:
    """Apply every active layer, then run the blocks the zygote sends on the command pipe. Never
    returns. fds: (stdout pipe, result pipe, command pipe); stage["res"] is where the result pipe
    currently is (so that a failure to apply a layer can be reported)."""
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
            (("null", devnull), ("out", out_w), ("res", res_w), ("cmd", cmd_r))}
    for name, dst in (("null", 0), ("out", 1), ("null", 2), ("res", 3), ("cmd", 4), ("out", 5)):
        os.dup2(high[name], dst)
    stage["res"] = 3
    os.closerange(6, 1 << 16)
    if not z.is_root and on["namespaces"]:
        # RLIMIT_NPROC counts the processes of one uid in one user namespace: without root every
        # child has the same uid, so without a namespace of its own a child's forks would count
        # against every other child's limit (and the zygote's).
        L.enter_user_namespace(0, 0)
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
               (resource.RLIMIT_FSIZE, WORKDIR_MB << 20),
               (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, cfg["max_processes"]),
               (resource.RLIMIT_CORE, 0)]
        for which, value in lim:
            resource.setrlimit(which, (value, value))
    if on["unprivileged_uid"] and z.is_root:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif on["unprivileged_uid"]:
        L.drop_capabilities()
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
    # Warm-up while nobody waits: the first block run in a fresh fork pays a few ms of copy-on-write
    # faults (compiler, eval loop, io); take them here, with the output going nowhere.
    os.dup2(2, 1)
    run_block("x = [i * 2 for i in range(3)]\nprint(x, 1.5)", {})
    os.dup2(5, 1)
    scope: dict = {"__name__": "__main__", "__builtins__": builtins}
    reader = L.FrameReader()
    while True:  # ready: wait for a block
        msg = None
        while msg is None:
            data = os.read(4, 1 << 20)
            if not data:
                os._exit(0)
            frames = reader.feed(data)
            msg = frames[0] if frames else None
        if "cpu_s" in msg and on["rlimits"]:  # the first block: from here on the limit can only go down
            resource.setrlimit(resource.RLIMIT_CPU, (msg["cpu_s"], msg["cpu_s"]))
        if msg.get("replay"):  # a lost session's earlier blocks, output discarded
            os.dup2(2, 1)
            for block in msg["replay"]:
                run_block(block, scope)
            os.dup2(5, 1)
        ok, err = run_block(msg["code"], scope, repl=bool(z.cfg.get("repl_last_expression")))
        os.write(3, L.pack_frame({"ok": ok, "error": err}))
        if not msg.get("keep"):
            os._exit(0)
