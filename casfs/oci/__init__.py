"""casfs and the OCI ecosystem: a registry client (``registry``), the runnable image that
points containerd at a casfs image (``publish``), and containerd's snapshotter
(``casfs.containerd``). The registry as a casfs store is ``casfs.objects.oci``."""
