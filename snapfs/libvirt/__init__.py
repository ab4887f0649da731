"""libvirt sources: backups into a repository (``backup``) and a live point-in-time view
(``source``), both through pull-mode backup jobs (``jobs``).

Only this package imports ``libvirt``. It also reads exports with libnbd directly (the
copy loop of ``backup``), an exception to "only ``nbd/`` imports ``nbd``": the copy is a
blocking batch job with no use for the mount's AIO connections.
"""
