"""The `graft` CNI plugin: a pod's hostPort mappings become its graft table.

Chained after the plugin that gives the pod its interface (bridge + host-local, for example),
in the conflist of the RuntimeClass whose handler is graft-runtime. On ADD it reads the kubelet's
`runtimeConfig.portMappings` (capability `portMappings`) and writes, for the pod's netns, one
endpoint per mapping on the node address (the mapping's `hostIP`, else the configured `hostIP` /
`hostIPv6`) and the ingress pairs `0.0.0.0:containerPort=…` / `[::]:containerPort=…`: the pod's
listener is grafted onto the host port, with no DNAT and no proxy. Endpoints and rules of the
pod annotations `io.sockgraft.*` (capability `io.kubernetes.cri.pod-annotations`) join the table.
DEL removes exactly what ADD wrote; CHECK verifies it; ADD and DEL are idempotent. See
`plugin.py` for the configuration keys and docs/KUBERNETES.md for the whole picture.
"""
