"""Debian's nginx on 127.0.0.1: serving a directory read-only (an HTTP store, or any static
host), or as a caching proxy (an AZ cache made of stock parts)."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import subprocess
import tempfile
import time
from typing import Iterator

from .procs import free_port, log_tail, stop, wait_http

__all__ = ["NGINX", "nginx_cache", "nginx_static"]

NGINX = "/usr/sbin/nginx"


_CONF = """\
daemon off;
master_process off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""

_STATIC_HTTP = """\
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    {ranges}"""

_STATIC_SERVER = """\
        root {root};
        location / {{
            {autoindex}
            limit_except GET {{ deny all; }}
        }}"""

_CACHE_HTTP = """\
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=casfs:8m max_size=1g inactive=30d use_temp_path=off;"""

_CACHE_SERVER = """\
        location / {{
            limit_except GET {{ deny all; }}
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache casfs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 365d;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}"""


def _wait_tcp(port: int, proc: subprocess.Popen, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"nginx did not listen on {port}:\n{log_tail(log)}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _nginx(prefix: str, http: str, server: str, *, connections: int, binary: str,
           start_timeout: float, probe_http: bool, **fmt: str) -> Iterator[str]:
    """Run nginx with one server block on a free port (retried when the port was taken);
    yield ``http://127.0.0.1:PORT/``. ``probe_http``: wait for an HTTP answer at ``/``, else
    only for the port to accept (a caching proxy must not fetch anything at start)."""
    user = ""
    if os.geteuid() == 0:  # workers would otherwise drop to 'nobody' and could not read root
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        log = os.path.join(tmp, "error.log")
        conf = os.path.join(tmp, "nginx.conf")
        for attempt in range(3):
            port = free_port()
            values = {"tmp": tmp, **fmt}
            with open(conf, "w") as f:
                f.write(_CONF.format(tmp=tmp, user=user, port=port, connections=connections,
                                     http=http.format(**values), server=server.format(**values)))
            proc = subprocess.Popen([binary, "-p", tmp, "-c", conf, "-e", log],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
            try:
                if probe_http:
                    wait_http(f"http://127.0.0.1:{port}/", proc, log, start_timeout)
                else:
                    _wait_tcp(port, proc, log, start_timeout)
                break
            except RuntimeError:
                stop(proc)
                if attempt == 2 or "in use" not in log_tail(log):
                    raise
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            stop(proc)


def nginx_static(root: str, *, autoindex: bool = True, ranges: bool = True,
                 binary: str = NGINX, start_timeout: float = 15.0) -> contextlib.AbstractContextManager[str]:
    """Serve directory ``root`` read-only with nginx; yield the base URL ``http://127.0.0.1:PORT/``.

    Args:
        autoindex: answer directory URLs with nginx's JSON autoindex (``autoindex on;
            autoindex_format json;``); when False a directory URL is 403.
        ranges: honour Range headers (206); when False nginx ignores them and sends the whole
            object with 200 (``max_ranges 0``), as some static hosts do.

    Only GET and HEAD are allowed (``limit_except GET``); anything else is 403.

    Raises:
        RuntimeError: with nginx's error log when it exits or does not answer in time.
    """
    return _nginx("casfs-nginx-", _STATIC_HTTP, _STATIC_SERVER, connections=1024, binary=binary,
                  start_timeout=start_timeout, probe_http=True, root=os.path.abspath(root),
                  ranges="" if ranges else "max_ranges 0;",
                  autoindex="autoindex on; autoindex_format json;" if autoindex else "autoindex off;")


def nginx_cache(upstream: str, *, binary: str = NGINX,
                start_timeout: float = 15.0) -> contextlib.AbstractContextManager[str]:
    """nginx as a caching proxy (``proxy_cache``, keyed by path, one fetch per object with
    ``proxy_cache_lock``, ``X-Cache-Status`` on every answer) in front of ``upstream``; yield
    its base URL. It fetches nothing from ``upstream`` until asked.

    Raises:
        RuntimeError: with nginx's error log when it exits or does not listen in time.
    """
    return _nginx("casfs-nginx-cache-", _CACHE_HTTP, _CACHE_SERVER, connections=256, binary=binary,
                  start_timeout=start_timeout, probe_http=False, upstream=upstream)
