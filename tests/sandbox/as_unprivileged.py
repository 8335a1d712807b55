"""Run a command as an unprivileged user: `python tests/sandbox/as_unprivileged.py CMD ARGS...`.

The sandbox has two ways in: as root, or through an unprivileged user namespace. CI runs as root, so
without this the second would never run. Run as root, this takes uid and gid 65534 (`nobody`: no
capabilities, no supplementary groups) in a private mount namespace where every directory on the
way to this interpreter and to the project is traversable (a pyenv under /root, mode 0700, is the
usual obstacle: a tmpfs over /root holds a bind of only what is needed; nothing on the host
changes; /tmp is a tmpfs of its own), then execs CMD. Run as anyone else, it execs CMD as that user.
With --no-user-namespaces, CMD cannot create a user namespace either, as in a container under its
runtime's default seccomp profile.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cir_actors.sandbox import layers as L

NOBODY = 65534


def _first_closed_ancestor(path: Path) -> Path | None:
    """The first directory above `path` that others may not traverse (no o+x), or None."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _open_the_way_to(path: Path, scratch: Path) -> None:
    """Make every directory above `path` traversable in this mount namespace: each closed one is
    covered by a tmpfs (mode 0755) holding a bind of its entry on the way to `path` only."""
    while (closed := _first_closed_ancestor(path)) is not None:
        entry = closed / path.relative_to(closed).parts[0]
        keep = Path(tempfile.mkdtemp(dir=scratch))
        L.mount(str(closed), str(keep), None, L.MS_BIND)
        L.mount("cir-unprivileged", str(closed), "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")
        if (keep / entry.name).is_dir():
            entry.mkdir()
        else:
            entry.touch()
        L.mount(str(keep / entry.name), str(entry), None, L.MS_BIND | L.MS_REC)


def _refuse_user_namespaces() -> None:
    """What a container runtime's default seccomp profile does to a process without CAP_SYS_ADMIN:
    unshare and clone with CLONE_NEWUSER fail with EPERM (clone3 with ENOSYS, so libc falls back)."""
    import errno

    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for call in ("unshare", "clone"):
        f.add_rule(sc.ERRNO(errno.EPERM), call, sc.Arg(0, sc.MASKED_EQ, L.CLONE_NEWUSER, L.CLONE_NEWUSER))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    f.load()


def main(argv: list[str]) -> None:
    no_userns = argv[:1] == ["--no-user-namespaces"]
    argv = argv[1:] if no_userns else argv
    if not argv:
        raise SystemExit("usage: as_unprivileged.py [--no-user-namespaces] CMD [ARGS...]")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if os.geteuid() == 0:
        L.unshare(L.CLONE_NEWNS)
        L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
        # A /tmp of its own: what the command writes there, and the binds below, vanish with it.
        L.mount("cir-unprivileged-tmp", "/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=1777")
        scratch = Path(tempfile.mkdtemp(prefix="cir-unprivileged-", dir="/tmp"))
        project = Path(__file__).resolve().parents[2]
        for needed in {Path(os.path.realpath(sys.base_prefix)), Path(os.path.realpath(sys.prefix)), project}:
            _open_the_way_to(needed, scratch)
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # from uid 0 to another: every capability is dropped
        env.update(HOME="/tmp", USER="nobody")
    if no_userns:
        _refuse_user_namespaces()
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
