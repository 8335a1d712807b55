"""The kernel mechanisms the interpreter sandbox is made of, as small functions over raw syscalls.

Covers: namespaces (unshare/setns), the read-only filesystem jail (bind mounts into a tmpfs root),
landlock (filesystem, TCP and signal scoping), a seccomp deny-list compiled once to BPF and loaded
with prctl, and the length-prefixed msgpack frames spoken between the supervisor, the zygote and
the children. Linux x86-64/aarch64 only. This module decides nothing about *when* a layer is
applied or what happens if it fails: that is `sandbox/zygote.py`'s job.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

import msgpack

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
SECCOMP_MODE_FILTER = 2


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), f"prctl({option})")


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24


def drop_capabilities() -> None:
    """Clear the effective, permitted and inheritable sets and the bounding set. As root, the
    switch to an unprivileged uid does this; in a user namespace the child stays its root, with
    every capability over its own namespaces, which its code needs none of."""
    for cap in range(64):  # up to the kernel's last capability, the first one it does not know
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0:
            if ctypes.get_errno() == errno.EINVAL and cap > 0:
                break
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x {low, high} 32 bits: all 0
    _check(_libc.capset(header, data), "capset")


# ---- filesystem jail -------------------------------------------------------------------------

def interpreter_paths() -> list[str]:
    """The host paths a child needs to read to keep importing: system libraries and every prefix
    and sys.path directory of this Python (resolved; nested entries collapsed into their parent)."""
    import sys

    wanted = ["/usr", "/etc/ld.so.cache", sys.base_prefix, sys.prefix, sys.exec_prefix]
    wanted += [p for p in sys.path if os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p)]
    resolved = sorted({os.path.realpath(p) for p in wanted if os.path.exists(p)})
    kept: list[str] = []
    for p in resolved:
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def enter_user_namespace(uid: int, gid: int) -> None:
    """unshare a new user namespace whose root is `uid`/`gid` of the current one (the only mapping a
    process may write for itself: its own ids, with setgroups denied). It gains every capability
    over the namespaces it then creates, and none over the host's."""
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def build_jail(root: str, ro_paths: list[str], work: str = "work") -> None:
    """Make `root` (an empty directory) a tmpfs holding read-only binds of `ro_paths` at their own
    paths, top-level symlinks such as /lib -> usr/lib, a minimal /dev and an empty mountpoint
    `work` for the per-call working directory. Must run as root in a private mount namespace."""
    mount("cir-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for name in os.listdir("/"):
        link = os.path.join("/", name)
        if os.path.islink(link):  # merged-/usr layouts: /lib -> usr/lib, /bin -> usr/bin
            os.symlink(os.readlink(link), os.path.join(root, name))
    for host in ro_paths:
        inside = root + host
        if os.path.isdir(host):
            os.makedirs(inside, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            Path(inside).touch()
        mount(host, inside, None, MS_BIND | MS_REC)
        mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("null", "zero", "urandom", "random"):
        Path(f"{root}/dev/{dev}").touch()
        mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    os.makedirs(os.path.join(root, work), mode=0o755, exist_ok=True)
    if not os.path.lexists(os.path.join(root, "tmp")):
        os.symlink(work, os.path.join(root, "tmp"))
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


# ---- landlock --------------------------------------------------------------------------------

_SYS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_LL_CREATE, _LL_ADD, _LL_RESTRICT = _SYS.get(os.uname().machine, (444, 445, 446))
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# filesystem rights by the ABI version that introduced them
_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2


def landlock_abi() -> int:
    """The kernel's landlock ABI version (0 when landlock is absent or disabled)."""
    ret = _libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(ret), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_restrict(abi: int, read_paths: list[str], write_paths: list[str]) -> None:
    """Restrict this process (and its future children) to reading `read_paths` and reading and
    writing `write_paths`; with ABI >= 4 no TCP bind/connect, with ABI >= 6 no signals to processes
    outside the domain and no abstract unix sockets. Needs no_new_privs (or CAP_SYS_ADMIN)."""
    fs_all = _FS_RIGHTS[max(v for v in _FS_RIGHTS if v <= abi)]
    attr = _RulesetAttr(fs_all, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _check(_libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (fs_all & (FS_TRUNCATE | FS_IOCTL_DEV))
    try:
        for path, rights in [(p, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR) for p in read_paths] + [
            (p, fs_all) for p in write_paths
        ]:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rule = _PathBeneath(rights, fd)
                _check(_libc.syscall(_LL_ADD, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
                       f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_libc.syscall(_LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# ---- seccomp ---------------------------------------------------------------------------------

# Denied with EPERM. Everything else is allowed: ordinary Python (threads, mmap, pipes, fork within
# RLIMIT_NPROC) keeps working, while the kernel's larger attack surface and every way out of the
# namespaces and the jail are closed.
DENIED_SYSCALLS = [
    "socket", "socketpair", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
    "pivot_root", "chroot", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "adjtimex",
    "clock_adjtime", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
    "name_to_handle_at", "quotactl", "sethostname", "setdomainname", "kcmp", "syslog", "vhangup",
    "fanotify_init", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
    "mount_setattr", "iopl", "ioperm", "lookup_dcookie", "personality", "uselib", "nfsservctl",
    "landlock_create_ruleset", "pidfd_getfd",
]


def compile_seccomp() -> bytes:
    """The deny-list filter as raw BPF (compiled once; loading it per child is one prctl)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError):  # unknown on this architecture
            pass
    # clone with any namespace flag (clone3 is refused outright so libc falls back to clone)
    for bit in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, 0x02000000):
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("seccomp-bpf")
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            f.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(bpf: bytes) -> None:
    """Install a BPF program built by `compile_seccomp` on this process (needs no_new_privs)."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


# ---- frames ----------------------------------------------------------------------------------

_LEN = struct.Struct(">I")
MAX_FRAME = 64 << 20


def pack_frame(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into msgpack frames; refuses frames larger than MAX_FRAME."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < 4 + n:
                break
            out.append(msgpack.unpackb(bytes(self._buf[4 : 4 + n]), raw=False, strict_map_key=True))
            del self._buf[: 4 + n]
        return out
