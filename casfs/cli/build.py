"""``casfs build``: a directory, tar (docker save) or OCI layout -> an image in the store."""

from __future__ import annotations

import argparse

from .format import human, parse_size
from .main import open_store_from_args


LIMITS = """\
limits (measured on the 2-core VM, peak RSS of the whole build, docs/benchmarks.md):
  entries   at most {max_entries:,} per image; the build holds about 0.6 KiB of memory
            per empty file or directory and 1.4 KiB per file with content from a
            directory, 1.2 / 2.2 KiB from a tar (1,000,000 files: ~0.6-2.2 GiB)
  sparse    holes of sparse files (a tar's sparse members, files on disk with
            SEEK_HOLE) are neither read nor hashed: a 2 KiB tar claiming 1 TiB
            builds in about a second; a sparse tar member may claim at most {max_sparse}
  contents  everything else is read and hashed once: a compressed archive costs
            its uncompressed size (zero chunks are recognised without hashing)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build an image from a directory, tar, docker-save tar or OCI layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build an image from SRC and tag it. SRC is a directory, a tar archive (plain or\n"
                    "`docker save` output, layers applied in order with whiteouts), or an OCI image\n"
                    "layout directory (`skopeo copy docker-archive:x.tar oci:DIR`). Chunks already\n"
                    "in the store (from any tagged image) are not stored again.",
        epilog=LIMITS)
    p.add_argument("src", metavar="SRC")
    p.add_argument("--tag", "-t", required=True, metavar="NAME", help="tag for the new image")
    p.add_argument("--chunk-size", default="auto", metavar="SIZE",
                   help="one chunk size for every file, a power of two from 4K to 256M; default "
                        "auto: each file its own, 16M for model weights (.safetensors .bin .pt .pth "
                        ".gguf .onnx .npy) and large incompressible files, 512K for everything else")
    p.add_argument("--compress", choices=("auto", "always", "never"), default="auto",
                   help="codec policy: auto (default) stores model weights (.safetensors .bin .pt .pth "
                        ".gguf .onnx .npy) raw for zero-copy reads and zstd-compresses other chunks "
                        "that shrink by >= 10%%; always: zstd wherever it shrinks a chunk; never: all raw")
    p.add_argument("--block-size", default="64K", metavar="SIZE",
                   help="block size of blocked frames: chunks longer than it are read and verified "
                        "block by block, so a small read fetches a block, not its chunk; a power of two "
                        "from 16K to 1M, or 0 for whole frames only (default 64K)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=cmd_build)
    from casfs.build.source import MAX_ENTRIES
    from casfs.build.tar import MAX_SPARSE_BYTES

    p.epilog = LIMITS.format(max_entries=MAX_ENTRIES, max_sparse=human(MAX_SPARSE_BYTES))


def cmd_build(args: argparse.Namespace) -> int:
    import casfs
    from casfs.build import check_build_options, open_source

    block = 0 if args.block_size.strip() == "0" else parse_size(args.block_size)
    if block and (block & (block - 1) or not (16 << 10) <= block <= (1 << 20)):
        raise ValueError(f"--block-size {args.block_size}: use a power of two from 16K to 1M, or 0")
    chunk_size = None if args.chunk_size == "auto" else parse_size(args.chunk_size)
    # a bad tag, size or source is refused before a new store is created for it
    check_build_options(args.tag, chunk_size, args.compress)
    source = open_source(args.src)
    store = open_store_from_args(args, create=True)
    r = casfs.build(store, source, tag=args.tag, chunk_size=chunk_size,
                    progress=False if args.no_progress else None, compress=args.compress,
                    block=block)
    p = r.pack
    print(f"built {args.tag} {r.image_id}")
    print(f"  {r.entries} entries, {human(p.bytes_in)} in {r.seconds:.2f} s ({r.mb_per_s:.0f} MB/s)")
    print(f"  chunks: {p.chunks_total} total, {p.chunks_new} new, {p.chunks_reused} reused; "
          f"stored {human(p.bytes_stored)} new ({p.packs} packs, {p.loose} loose); index {human(r.index_bytes)}")
    return 0
