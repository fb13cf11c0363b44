"""``casfs push``: publish an image to an OCI registry, runnable by containerd (casfs snapshotter)."""

from __future__ import annotations

import argparse
import shlex

from .format import human

EPILOG = """\
The registry then holds the image's objects as blobs, a catalog mapping casfs names to them, and
a small runnable OCI image (config + a reference layer of a few hundred bytes). Run it with the
casfs snapshotter:

  ctr image pull --snapshotter casfs HOST/REPO:TAG      (--plain-http for an http registry)
  ctr run --rm --snapshotter casfs HOST/REPO:TAG demo /bin/sh -c 'echo hi'

Registries on 127.0.0.1/localhost are spoken to over http, others over https unless --insecure.
Credentials: CASFS_OCI_USERNAME / CASFS_OCI_PASSWORD (Basic auth).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="publish an image to an OCI registry (runnable with containerd)",
                       description="Copy image NAME from --store (or --from) to an OCI registry "
                                   "repository, sending only the objects it lacks, and tag it there as "
                                   "an image containerd can run through `casfs snapshotter`.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="image tag or id in the source store")
    p.add_argument("dest", metavar="[oci://]HOST[:PORT]/REPO[:TAG]",
                   help="where to publish (TAG defaults to NAME when NAME is a tag, else 'latest')")
    p.add_argument("--from", dest="src", metavar="URL", default=None, help="source store (default: --store)")
    p.add_argument("--insecure", action="store_true", help="plain http for a registry not on this host")
    p.add_argument("--cmd", default=None, metavar="'CMD ARG...'",
                   help="the image's default command, split like a shell would (default: /bin/sh)")
    p.add_argument("--entrypoint", default=None, metavar="'CMD ARG...'",
                   help="the image's entrypoint, split like a shell would")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the image (repeatable; PATH has a default)")
    p.add_argument("--workdir", default="/", help="working directory (default /)")
    p.add_argument("--platform", default=None, metavar="OS/ARCH",
                   help="platform the image is published for (default: this machine's)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_push)


def parse_destination(dest: str, insecure: bool = False) -> tuple[str, str, str | None]:
    """(store URL, repository reference without tag, tag or None) of ``[oci://]host/repo[:tag]``.

    Raises:
        ValueError: without a host and repository.
    """
    rest = dest[len("oci://"):] if dest.startswith("oci://") else dest
    host, _, path = rest.partition("/")
    tag = None
    if ":" in path.rpartition("/")[2]:
        path, _, tag = path.rpartition(":")
    if not host or not path:
        raise ValueError(f"{dest!r}: the destination looks like HOST[:PORT]/REPO[:TAG]")
    return f"oci://{host}/{path}" + ("?insecure=1" if insecure else ""), f"{host}/{path}", tag or None


def cmd_push(args: argparse.Namespace) -> int:
    import casfs
    from casfs.copy import copy_image
    from casfs.objects.oci import INTERNAL
    from casfs.oci.publish import ImageConfig
    from casfs.oci.registry import TAG_RE
    from casfs.store import check_tag

    url, repo_ref, tag = parse_destination(args.dest, args.insecure)
    src = casfs.open_store(args.src or args.store, cache_dir="")
    image_id = src.resolve(args.name)
    tag = tag or (args.name if not args.name.startswith(image_id[:8]) else "latest")
    # refused before anything is uploaded (an invalid tag used to fail after the whole copy)
    check_tag(tag)
    if not TAG_RE.match(tag) or tag.startswith(INTERNAL):
        raise ValueError(f"{tag!r} cannot be a registry tag: use letters, digits and _.- (at most 128, "
                         f"not starting with {INTERNAL!r})")
    cfg = ImageConfig(workdir=args.workdir)
    for flag, value in (("--cmd", args.cmd), ("--entrypoint", args.entrypoint)):
        if value:
            try:
                words = shlex.split(value)
            except ValueError as e:
                raise ValueError(f"{flag} {value!r}: {e} (quote it as a shell would)") from None
            setattr(cfg, flag[2:], words)
    for kv in args.env:
        if "=" not in kv:
            raise ValueError(f"--env {kv!r}: use KEY=VALUE")
        key = kv.partition("=")[0]
        cfg.env = [e for e in cfg.env if e.partition("=")[0] != key] + [kv]
    if args.platform:
        os_, _, arch = args.platform.partition("/")
        if not os_ or not arch:
            raise ValueError(f"--platform {args.platform!r}: use OS/ARCH, e.g. linux/amd64")
        cfg.os, cfg.arch = os_, arch
    dst = casfs.open_store(url, cache_dir="")
    dst.objects.image_config = cfg
    _push_profile(src, dst, image_id)  # before the tag: the image's catalog then lists it
    r = copy_image(src, dst, image_id, tag=tag, threads=args.threads,
                   progress=False if args.no_progress else None)
    print(f"pushed {args.name} ({r.image_id[:12]}) to {repo_ref}:{tag}: {r.objects_copied} of "
          f"{r.objects_total} objects, {human(r.bytes_copied)} in {r.seconds:.2f} s")
    print(f"run it: ctr image pull --snapshotter casfs {repo_ref}:{tag}")
    return 0


def _push_profile(src, dst, image_id: str) -> None:
    """Publish the image's startup profile with it (hosts that mount it replay it as a prefetch)."""
    from casfs.layout import profile_key

    key = profile_key(image_id)
    try:
        data = src.objects.get(key)
    except KeyError:
        return
    dst.objects.put(key, data)
