"""CRIU as a managed dependency: finding a usable binary, running it, and explaining failures.

CRIU (Checkpoint/Restore In Userspace) dumps a process tree to image files and restores it.
This module knows three things about it and nothing about casfs images (it uses only
casfs.atomic_write, for its check cache):

* **Finding it.** ``find_criu()`` returns the first usable binary (version >= 4.2 and
  ``criu check`` passing) among ``$CASFS_CRIU``, the project-local builds
  ``<repo>/.cache/criu-*/bin/criu`` made by ``scripts/build_criu.sh``, and ``criu`` on PATH.
  Older releases do not work on this kernel (3.17: vDSO; 4.1: any inet socket), so they are
  passed over, and ``CriuUnavailable`` says how to get a good one.
* **Running it.** ``run()`` runs one command to completion; ``start()`` starts a long-lived
  one (``restore`` without ``-d``, ``lazy-pages``). Both log at ``-v4`` into a file the caller
  names, so a failure can be explained.
* **Explaining it.** ``explain_log()`` turns CRIU's log into the failure reason plus, for
  known rules a snapshotted process must follow, the fix. ``tree_rule_problems()`` checks
  those rules on a live process tree before a dump, so the user hears "file X is open for
  writing without O_APPEND" instead of a restore failing later.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat as statmod
import subprocess
import sys
import threading
from typing import Iterable
from dataclasses import dataclass, field

import casfs

__all__ = [
    "Criu",
    "CriuError",
    "CriuUnavailable",
    "MIN_VERSION",
    "RuleViolation",
    "explain_log",
    "find_criu",
    "process_tree",
    "tree_rule_problems",
]

MIN_VERSION = (4, 2)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_HINT = ("run `make setup` (or `bash scripts/build_criu.sh`) to build CRIU 4.2 from Debian's "
              "source package into .cache/, or install criu >= 4.2 and set CASFS_CRIU=/path/to/criu")


class CriuError(RuntimeError):
    """CRIU failed. ``reasons`` are the explained failure lines; ``log`` is the log file path."""

    def __init__(self, message: str, *, reasons: list[str] | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or []
        self.log = log


class CriuUnavailable(CriuError):
    """No usable CRIU (>= 4.2, ``criu check`` passing) on this host; the message says how to get one.

    ``kernel_lacks_feature`` is True when a CRIU >= 4.2 exists but ``criu check`` fails (the
    kernel, not the installation, is what is missing).
    """

    kernel_lacks_feature: bool = False


class RuleViolation(CriuError):
    """The process tree breaks a rule CRIU needs (listed in ``reasons``, each with its fix)."""


@dataclass(frozen=True)
class Criu:
    """A usable CRIU binary."""

    path: str
    version: tuple[int, ...]
    version_text: str
    features: dict[str, bool] = field(default_factory=dict, compare=False)

    def cmd(self, *args: str) -> list[str]:
        return [self.path, *args]


_VERSION = re.compile(r"^Version:\s*([0-9][0-9.]*)", re.M)
_found: Criu | None = None
_found_lock = threading.Lock()


def criu_version(path: str) -> tuple[tuple[int, ...], str] | None:
    """(version tuple, text) of the CRIU at ``path``, or None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.search(out)
    if not m:
        return None
    text = m.group(1)
    return tuple(int(x) for x in text.split(".") if x), text


def candidates() -> list[str]:
    """Paths tried by ``find_criu``, in order (existing or not)."""
    out = []
    if os.environ.get("CASFS_CRIU"):
        out.append(os.environ["CASFS_CRIU"])
    cache = os.environ.get("CASFS_CRIU_CACHE") or os.path.join(REPO_ROOT, ".cache")
    out.extend(sorted(glob.glob(os.path.join(cache, "criu-*", "bin", "criu")), reverse=True))
    on_path = shutil.which("criu")
    if on_path:
        out.append(on_path)
    return out


def _check_cache_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"casfs-criu-check-{os.getuid()}.json")


def _check_cache_key(path: str) -> str:
    st = os.stat(path)
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{boot}"


def _cached_check(path: str) -> Criu | None:
    """A CRIU that passed ``criu check`` since this boot (the binary unchanged), else None."""
    try:
        with open(_check_cache_path(), encoding="utf-8") as f:
            hit = json.load(f).get(_check_cache_key(path))
        if hit:
            v = hit["version_text"]
            return Criu(path, tuple(int(x) for x in v.split(".")), v, dict(hit["features"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _save_check(c: Criu) -> None:
    p = _check_cache_path()
    try:
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data[_check_cache_key(c.path)] = {"version_text": c.version_text, "features": c.features}
        casfs.atomic_write(p, json.dumps(data))
    except OSError:
        pass


def find_criu(*, refresh: bool = False) -> Criu:
    """The first usable CRIU (see the module docstring); cached per process, and the result of
    ``criu check`` cached per boot in ``$XDG_RUNTIME_DIR`` (or /tmp) unless ``refresh``.

    Raises:
        CriuUnavailable: listing what was found and why it was passed over, and how to build one.
    """
    global _found
    with _found_lock:
        if _found is not None and not refresh:
            return _found
        passed: list[str] = []
        failed_check: list[str] = []
        for path in candidates():
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                passed.append(f"{path}: not an executable")
                continue
            hit = None if refresh else _cached_check(path)
            if hit is not None and hit.version >= MIN_VERSION:
                _found = hit
                return hit
            v = criu_version(path)
            if v is None:
                passed.append(f"{path}: `criu --version` failed")
                continue
            if v[0] < MIN_VERSION:
                passed.append(f"{path}: version {v[1]} is older than 4.2 (3.17 fails on this "
                              "kernel's vDSO, 4.1 on inet sockets)")
                continue
            chk = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
            if chk.returncode != 0:
                failed_check.append(path)
                why = (chk.stderr or chk.stdout).strip().splitlines()[-3:]
                passed.append(f"{path}: `criu check` failed: {' / '.join(why)}")
                continue
            feats = {}
            for feat in ("uffd-noncoop",):
                r = subprocess.run([path, "check", "--feature", feat], capture_output=True, timeout=30)
                feats[feat] = r.returncode == 0
            _found = Criu(path, v[0], v[1], feats)
            _save_check(_found)
            return _found
        detail = "; ".join(passed) if passed else "no criu found"
        err = CriuUnavailable(f"no usable CRIU >= 4.2 ({detail}): {BUILD_HINT}")
        err.kernel_lacks_feature = bool(failed_check)
        raise err


# ---------------------------------------------------------------------------------------------
# running


def run(criu: Criu, args: list[str], *, log: str, action: str, timeout: float = 600.0,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``criu ARGS -v4 -o LOG`` to completion.

    ``log`` must be an absolute path (CRIU writes it relative to its work dir otherwise).

    Raises:
        CriuError: on a nonzero exit or a timeout, with the explained reason from the log.
    """
    cmd = criu.cmd(*args, "-v4", "--log-file", log)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise failure(f"criu {action} did not finish in {timeout:.0f} s", log) from None
    if r.returncode != 0:
        raise failure(f"criu {action} failed (exit {r.returncode})", log, extra=r.stderr)
    return r


def start(criu: Criu, args: list[str], *, log: str, stderr_path: str,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start ``criu ARGS -v4 -o LOG`` in the background (stdout/stderr into ``stderr_path``)."""
    err = open(stderr_path, "ab")
    try:
        return subprocess.Popen(criu.cmd(*args, "-v4", "--log-file", log), stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, pass_fds=pass_fds, close_fds=True)
    finally:
        err.close()


# The parent of a restored tree: becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER),
# runs `criu restore -d`, adopts the tree's root when criu exits, and exits with the root's
# status (128+N for signal N). CRIU itself always exits 0 after the tree it waited on ends.
_REAPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit(254)
c = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, st = os.waitpid(c, 0)
if os.waitstatus_to_exitcode(st) != 0:
    os._exit(255)
code = 0
first = True
while True:
    try:
        _, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if first:
        code, first = os.waitstatus_to_exitcode(st), False
os._exit(128 - code if code < 0 else code)
"""


def start_restore(criu: Criu, args: list[str], *, log: str, stderr_path: str) -> subprocess.Popen:
    """Start ``criu restore ARGS -d`` under a small reaper process that stays the restored
    tree's parent: the returned Popen's ``wait()`` gives the tree's exit status."""
    err = open(stderr_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER,
                                 *criu.cmd(*args, "-d", "-v4", "--log-file", log)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True)
    finally:
        err.close()


def read_tail(path: str, limit: int = 4 << 20) -> str:
    """The last ``limit`` bytes of a text file ('' when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def failure(message: str, log: str, *, extra: str = "", cls: type = CriuError) -> CriuError:
    """A CriuError for ``message`` with the reasons explained from ``log`` (and stderr ``extra``)."""
    reasons = explain_log(read_tail(log) + "\n" + (extra or ""))
    text = message + (": " + "; ".join(reasons) if reasons else "") + f" (log: {log})"
    return cls(text, reasons=reasons, log=log)


# ---------------------------------------------------------------------------------------------
# log explanations

# (pattern, explanation) for CRIU log lines whose cause we know; the explanation may use the
# pattern's groups. Order matters: the first match for a line wins.
_KNOWN: list[tuple[re.Pattern, str]] = [
    (re.compile(r"File (\S+) has bad size (\d+) \(expect (\d+)\)"),
     "file {0} was open for writing without O_APPEND when the snapshot was taken, and its size "
     "changed since ({1} bytes now, {2} at the dump): CRIU restores only files of unchanged size. "
     "Open files the process writes with O_APPEND (Python: open(path, 'a')), or close them before "
     "snapshot.ready()"),
    (re.compile(r"Unknown shit \S+ \(anon_inode:\[io_uring\]\)|io_uring"),
     "the process uses io_uring, which CRIU cannot dump: disable it (uvloop/libuv: start the "
     "process under a seccomp filter that makes io_uring_setup fail with ENOSYS, or use asyncio's "
     "own event loop)"),
    (re.compile(r"Connected TCP socket, consider using --tcp-established"),
     "the process has an established TCP connection: dump with --tcp-established"),
    (re.compile(r"(External socket is used|Can't dump half of stream unix connection|"
                r"unix: .*peer .* not found|Unix socket .* is external)"),
     "the process has a unix socket connected to a process outside the snapshot: close it "
     "before snapshot.ready() and reopen it in an after_restore hook"),
    (re.compile(r"(Can't dump .*tty|tty: .*controlling|Found .* tty|Unsupported tty)"),
     "the process holds a terminal: start it with snapshot.spawn (setsid, stdio to files or "
     "/dev/null)"),
    (re.compile(r"Some file locks are hold without --file-locks"),
     "the process holds file locks: dump with --file-locks"),
    (re.compile(r"Can't dump ghost file (\S+) of (\d+) size, increase limit"),
     "deleted file {0} still open by the process is {1} bytes, more than --ghost-limit: close it "
     "before the snapshot or raise the limit"),
    (re.compile(r"Can't fork for (\d+): File exists|PID (\d+) is already in use|"
                r"Pid (\d+) do not match expected"),
     "a PID of the snapshot is in use on this host: the snapshot was taken without its own PID "
     "namespace (start the process with snapshot.spawn, which runs it as `unshare -p -f setsid`)"),
    (re.compile(r"Can't open file (\S+) on restore|Can't open (\S+) on restore|"
                r"open\S* (\S+) .*No such file or directory"),
     "a file the process had open is missing on this host ({0}{1}{2}): restore where the same "
     "files exist (the same image mounted at the same path)"),
    (re.compile(r"File (\S+) has bad mode|has bad build-id|Build-id .* mismatch"),
     "a file the process maps changed since the snapshot ({0}): restore on a host with the same "
     "files"),
    (re.compile(r"(uffd|userfaultfd).*(Operation not permitted|not supported|Function not implemented)",
                re.I),
     "lazy restore needs userfaultfd (set vm.unprivileged_userfaultfd=1 or run as root), or "
     "restore eagerly (lazy=False)"),
    (re.compile(r"Can't (?:find|link) .*link_remap"),
     "a link_remap file for a deleted-but-open file is gone: restore through snapshot.restore, "
     "which puts the stored copy back"),
    (re.compile(r"Dumping (\S+) is not supported|Can't dump (\S+)"),
     "CRIU cannot dump {0}{1}"),
]
_ERROR_LINE = re.compile(r"^\(?[\d. ]*\)?\s*Error \((?P<src>[^)]*)\): (?P<msg>.*)$")
_HARMLESS = re.compile(r"rlimit: Can't setup RLIMIT_NOFILE|Could not process rule|delete table inet CRIU|"
                       r"Unable to set TCP_(?:CORK|NODELAY)|"
                       r"\^\^\^")


def explain_log(text: str, limit: int = 4) -> list[str]:
    """Reasons for a CRIU failure from its log text (and stderr), most specific first.

    Known causes become their explanation with the fix; otherwise the last few ``Error``
    lines are returned as they are (harmless noise such as RLIMIT_NOFILE is skipped).
    """
    known: list[str] = []
    errors: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _HARMLESS.search(line):
            continue
        for pat, explanation in _KNOWN:
            m = pat.search(line)
            if m:
                # CRIU logs file paths relative to the root ("tmp/x"): show them absolute
                groups = [("/" + g if "/" in g and not g.startswith("/") and " " not in g else g)
                          for g in (g or "" for g in m.groups())] + [""] * 4
                msg = explanation.format(*groups)
                if msg not in known:
                    known.append(msg)
                break
        m = _ERROR_LINE.match(line)
        if m:
            errors.append(f"{m.group('msg')} [{m.group('src')}]")
    if known:
        return known[:limit]
    return errors[-limit:]


# ---------------------------------------------------------------------------------------------
# rules a snapshotted process must follow, checked on the live tree before a dump


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (threads' children included), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def fd_flags(pid: int, fd: str) -> int | None:
    """The open flags of ``/proc/PID/fd/FD`` (from fdinfo), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        return None
    return None


def open_files(pid: int) -> list[dict]:
    """Every fd of ``pid``: ``{"fd", "target", "flags", "regular", "deleted", "size"}``."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        flags = fd_flags(pid, fd)
        if flags is None:
            continue
        deleted = target.endswith(" (deleted)")
        out.append({"fd": int(fd), "target": target, "flags": flags,
                    "regular": statmod.S_ISREG(st.st_mode), "deleted": deleted, "size": st.st_size,
                    "chr": statmod.S_ISCHR(st.st_mode)})
    return out


def tree_rule_problems(pid: int, saved: Iterable[str] = ()) -> list[str]:
    """Rules broken by the process tree rooted at ``pid``, each with its fix ([] when none).

    Checked: regular files open for writing must be ``O_WRONLY|O_APPEND`` (CRIU refuses to
    restore a file whose size changed, and a file the process writes changes), except the
    files in ``saved``: ones the snapshot stores and puts back before each restore (its
    /dev/shm segments, such as vLLM's psm_* queues), so their size always matches; no io_uring;
    no terminal.
    """
    saved = set(saved)
    problems = []
    for p in process_tree(pid):
        for f in open_files(p):
            acc = f["flags"] & os.O_ACCMODE
            where = f"pid {p} fd {f['fd']}"
            if f["regular"] and not f["deleted"] and acc != os.O_RDONLY and not (
                    acc == os.O_WRONLY and f["flags"] & os.O_APPEND) and f["target"] not in saved:
                mode = "read-write" if acc == os.O_RDWR else "writing"
                problems.append(
                    f"file {f['target']} is open for {mode} without O_APPEND ({where}): CRIU "
                    "restores a file only if its size has not changed since the dump; open files "
                    "the process writes with O_WRONLY|O_APPEND (Python: open(path, 'a')), or close "
                    "them before snapshot.ready()")
            elif f["target"] == "anon_inode:[io_uring]":
                problems.append(f"the process uses io_uring ({where}), which CRIU cannot dump: "
                                "disable it (e.g. a seccomp filter making io_uring_setup fail "
                                "with ENOSYS, or asyncio's own loop)")
            elif f["chr"] and re.match(r"^/dev/(pts/\d+|tty\S*|console)$", f["target"]):
                problems.append(f"the process holds the terminal {f['target']} ({where}): start it "
                                "with snapshot.spawn (setsid, stdio to files or /dev/null)")
    return problems
