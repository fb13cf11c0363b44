"""casfs as containerd's remote snapshotter (``casfs snapshotter``): ``api`` (the gRPC stubs,
generated from Debian's .proto files, never committed), ``metadata`` (SQLite), ``snapshotter``
(the snapshot model, casfs images as lazy mounts), ``service`` (the gRPC service on a unix
socket). Needs the ``containerd`` extra (grpcio, grpcio-tools)."""
