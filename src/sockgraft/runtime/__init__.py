"""Container runtimes: the OCI runtime wrapper `graft-runtime`, the OCI seccomp agent served by
graftd, and the annotations that carry a container's graft table.

Annotations (set with `docker run --annotation`, `podman run --annotation`, a pod's metadata):

- `io.sockgraft.endpoints`: endpoint specs separated by `;`, each in the `graft add` form,
  e.g. `http type ipv4 addr 127.0.0.1 port 8080; out type ipv4 addr 127.0.0.1 port dynamic`
- `io.sockgraft.ingress`: ingress pairs separated by spaces, e.g. `0.0.0.0:8080=http`
- `io.sockgraft.egress`: egress rules separated by spaces, e.g. `127.0.0.0/8=out`
"""
