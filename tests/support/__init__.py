"""Real servers on 127.0.0.1 for tests and benchmarks, one module per server: ``moto`` (S3),
``nginx`` (static files), ``faultproxy`` (a fault-injecting relay), ``registry`` (an OCI registry), ``procs`` (starting and
stopping them).

Tests import ``tests.support.<module>`` (pytest puts the repo root on ``sys.path``:
``pythonpath = ["."]`` in pyproject.toml); benchmarks run from the repo root as modules
(``python -m benchmarks.bench_tiers``) and import the same names.

Everything here starts real processes or real sockets (no in-process mocking):

``moto_server()``
    context manager: starts ``moto_server`` (from ``moto[server]``) as a separate process on a
    free port, yields its endpoint URL (``http://127.0.0.1:PORT``), kills it on exit.

``aws_test_environment()``
    context manager: dummy AWS credentials and none of the developer's AWS settings.

``nginx_static(root)``
    context manager: starts Debian's ``/usr/sbin/nginx`` with a generated config (daemon off,
    one process, pid and logs in a private temp dir) serving ``root`` read-only (GET/HEAD only)
    with a JSON autoindex; yields the base URL ``http://127.0.0.1:PORT/``.

``nginx_cache(upstream)``
    context manager: nginx as a caching proxy (proxy_cache) in front of ``upstream``.

``FaultProxy``
    a threaded TCP relay in front of a target port that injects faults on demand: latency per
    direction (and per new connection), a bandwidth cap, a connection cut after N bytes, canned
    HTTP error replies to the next N requests, and a hang. See its docstring.

``LyingServer`` (``tests.support.liar``)
    a hostile HTTP server that declares a 1 TiB body, or streams chunked or unframed bodies
    that never end, for the tests that prove casfs's clients bound what they read.

``registry_server()``
    context manager: Debian's ``docker-registry`` (distribution 2.8, the OCI distribution API)
    on a free port with filesystem storage in a temp dir; yields a ``Registry`` (host, port,
    storage root, ``blob_path(digest)``).

``procs.missing_binary(path)`` gives a skip reason when a binary is absent, so that tests skip with a
clear reason instead of failing where a server cannot run.
"""

from .faultproxy import DOWN, UP, FaultProxy
from .moto import MOTO_SERVER, aws_test_environment, moto_server
from .nginx import NGINX, nginx_cache, nginx_static
from .procs import free_port, missing_binary
from .registry import REGISTRY, Registry, registry_server

__all__ = ["DOWN", "FaultProxy", "MOTO_SERVER", "NGINX", "REGISTRY", "Registry", "UP",
           "aws_test_environment", "free_port", "missing_binary", "moto_server", "nginx_cache",
           "nginx_static", "registry_server"]
