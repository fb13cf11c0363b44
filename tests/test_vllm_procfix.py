"""vLLM in a snapshot's PID namespace reads its own /proc files (serve.vllm_procfix).

A real PID namespace (``unshare -p -f``, as ``snapshot.spawn`` makes) and vLLM's real
``cpu_resource_utils`` in .venv-vllm (scripts/setup_vllm.sh); needs root. The child process
that checks has a namespace PID the host has no process for: the case that ended a
default-mode ``--snapshot --create`` boot with ``FileNotFoundError: '/proc/35/status'``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare"),
]

# fork until a child's namespace PID is one the host has no process for, then let that child
# read its memory affinity the way vLLM's CPU worker does; exit status: 0 read (and psutil's RSS is this process's), 1 failed
CHECK = r"""
import os, sys
import psutil
if sys.argv[1] == "fix":
    from serve import vllm_procfix
    vllm_procfix.apply()
    assert vllm_procfix.foreign_proc()
from vllm.utils import cpu_resource_utils as cru
for _ in range(20000):
    pid = os.fork()
    if pid == 0:
        code = 5
        try:
            if os.path.exists(f"/proc/{os.getpid()}"):
                code = 3                     # the host has a process with this PID: next one
            elif not isinstance(cru.get_visible_memory_node(), list):
                code = 2
            else:                            # psutil: the worker's RSS, when it sizes its KV cache
                rss = psutil.Process(os.getpid()).memory_info().rss
                with open("/proc/self/statm") as f:
                    own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                code = 0 if abs(rss - own) < (8 << 20) else 2
        except (FileNotFoundError, psutil.NoSuchProcess):
            code = 1
        finally:
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 3:
        sys.exit(code)
sys.exit(4)
"""


def _check(mode: str) -> int:
    if os.environ.get("SKIP_VLLM") == "1":
        pytest.skip("SKIP_VLLM=1: the vLLM venv is deliberately absent")
    if not os.path.exists(VLLM_PY):
        pytest.fail(f"{VLLM_PY} is missing: run scripts/setup_vllm.sh (or set SKIP_VLLM=1)")
    p = subprocess.run(["unshare", "--kill-child", "-p", "-f", VLLM_PY, "-c", CHECK, mode], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    return p.returncode


def test_vllm_reads_its_memory_affinity_in_a_pid_namespace_whose_proc_is_the_hosts():
    assert _check("fix") == 0


def test_without_the_fix_vllm_fails_there_so_the_test_above_can_fail():
    assert _check("none") == 1
