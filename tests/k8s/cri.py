"""A client of the CRI `runtime.v1` gRPC services (RuntimeService, ImageService): the calls the
kubelet makes, for the messages this project needs.

The messages are written here from the public CRI API definition (k8s.io/cri-api,
pkg/apis/runtime/v1/api.proto): same package, names, field numbers and types, only the subset we
use (unknown fields of replies are kept by protobuf and ignored). Enums are carried as int32,
which is the same on the wire. The descriptors are built at import time; no generated code.
"""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "runtime.v1"
MAP = "map"  # map<string, string>

# name -> [(field, number, type)]; a type starting with "*" is repeated
MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "VersionRequest": [("version", 1, "string")],
    "VersionResponse": [("version", 1, "string"), ("runtime_name", 2, "string"),
                        ("runtime_version", 3, "string"), ("runtime_api_version", 4, "string")],
    "PortMapping": [("protocol", 1, "int32"), ("container_port", 2, "int32"), ("host_port", 3, "int32"),
                    ("host_ip", 4, "string")],
    "PodSandboxMetadata": [("name", 1, "string"), ("uid", 2, "string"), ("namespace", 3, "string"),
                           ("attempt", 4, "uint32")],
    "DNSConfig": [("servers", 1, "*string"), ("searches", 2, "*string"), ("options", 3, "*string")],
    "NamespaceOption": [("network", 1, "int32"), ("pid", 2, "int32"), ("ipc", 3, "int32"), ("target_id", 4, "string")],
    "LinuxSandboxSecurityContext": [("namespace_options", 1, "NamespaceOption")],
    "LinuxPodSandboxConfig": [("cgroup_parent", 1, "string"), ("security_context", 2, "LinuxSandboxSecurityContext"),
                              ("sysctls", 3, MAP)],
    "PodSandboxConfig": [("metadata", 1, "PodSandboxMetadata"), ("hostname", 2, "string"),
                         ("log_directory", 3, "string"), ("dns_config", 4, "DNSConfig"),
                         ("port_mappings", 5, "*PortMapping"), ("labels", 6, MAP), ("annotations", 7, MAP),
                         ("linux", 8, "LinuxPodSandboxConfig")],
    "RunPodSandboxRequest": [("config", 1, "PodSandboxConfig"), ("runtime_handler", 2, "string")],
    "RunPodSandboxResponse": [("pod_sandbox_id", 1, "string")],
    "StopPodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "StopPodSandboxResponse": [],
    "RemovePodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "RemovePodSandboxResponse": [],
    "PodSandboxStatusRequest": [("pod_sandbox_id", 1, "string"), ("verbose", 2, "bool")],
    "PodIP": [("ip", 1, "string")],
    "PodSandboxNetworkStatus": [("ip", 1, "string"), ("additional_ips", 2, "*PodIP")],
    "PodSandboxStatus": [("id", 1, "string"), ("metadata", 2, "PodSandboxMetadata"), ("state", 3, "int32"),
                         ("created_at", 4, "int64"), ("network", 5, "PodSandboxNetworkStatus"),
                         ("labels", 7, MAP), ("annotations", 8, MAP), ("runtime_handler", 9, "string")],
    "PodSandboxStatusResponse": [("status", 1, "PodSandboxStatus"), ("info", 2, MAP)],
    "PodSandboxFilter": [("id", 1, "string")],
    "ListPodSandboxRequest": [("filter", 1, "PodSandboxFilter")],
    "PodSandbox": [("id", 1, "string"), ("metadata", 2, "PodSandboxMetadata"), ("state", 3, "int32"),
                   ("created_at", 4, "int64"), ("labels", 5, MAP), ("annotations", 6, MAP),
                   ("runtime_handler", 7, "string")],
    "ListPodSandboxResponse": [("items", 1, "*PodSandbox")],
    "ImageSpec": [("image", 1, "string"), ("annotations", 2, MAP)],
    "KeyValue": [("key", 1, "string"), ("value", 2, "string")],
    "ContainerMetadata": [("name", 1, "string"), ("attempt", 2, "uint32")],
    "ContainerConfig": [("metadata", 1, "ContainerMetadata"), ("image", 2, "ImageSpec"), ("command", 3, "*string"),
                        ("args", 4, "*string"), ("working_dir", 5, "string"), ("envs", 6, "*KeyValue"),
                        ("labels", 9, MAP), ("annotations", 10, MAP), ("log_path", 11, "string")],
    "CreateContainerRequest": [("pod_sandbox_id", 1, "string"), ("config", 2, "ContainerConfig"),
                               ("sandbox_config", 3, "PodSandboxConfig")],
    "CreateContainerResponse": [("container_id", 1, "string")],
    "StartContainerRequest": [("container_id", 1, "string")],
    "StartContainerResponse": [],
    "StopContainerRequest": [("container_id", 1, "string"), ("timeout", 2, "int64")],
    "StopContainerResponse": [],
    "RemoveContainerRequest": [("container_id", 1, "string")],
    "RemoveContainerResponse": [],
    "ContainerStatusRequest": [("container_id", 1, "string"), ("verbose", 2, "bool")],
    "ContainerStatus": [("id", 1, "string"), ("metadata", 2, "ContainerMetadata"), ("state", 3, "int32"),
                        ("created_at", 4, "int64"), ("started_at", 5, "int64"), ("finished_at", 6, "int64"),
                        ("exit_code", 7, "int32"), ("image", 8, "ImageSpec"), ("image_ref", 9, "string"),
                        ("reason", 10, "string"), ("message", 11, "string")],
    "ContainerStatusResponse": [("status", 1, "ContainerStatus"), ("info", 2, MAP)],
    "ExecSyncRequest": [("container_id", 1, "string"), ("cmd", 2, "*string"), ("timeout", 3, "int64")],
    "ExecSyncResponse": [("stdout", 1, "bytes"), ("stderr", 2, "bytes"), ("exit_code", 3, "int32")],
    "ImageStatusRequest": [("image", 1, "ImageSpec"), ("verbose", 2, "bool")],
    "Image": [("id", 1, "string"), ("repo_tags", 2, "*string"), ("repo_digests", 3, "*string"), ("size", 4, "uint64")],
    "ImageStatusResponse": [("image", 1, "Image"), ("info", 2, MAP)],
}

# service -> {method: (request, response)}
SERVICES = {
    "RuntimeService": {
        name: (name + "Request", name + "Response") for name in (
            "Version", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus", "ListPodSandbox",
            "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer", "ContainerStatus", "ExecSync")
    },
    "ImageService": {"ImageStatus": ("ImageStatusRequest", "ImageStatusResponse")},
}

_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
}


def _build() -> dict[str, type]:
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="sockgraft_cri_subset.proto", package=PACKAGE, syntax="proto3")
    for name, fields in MESSAGES.items():
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype in fields:
            f = msg.field.add(name=fname, number=number, label=F.LABEL_OPTIONAL)
            if ftype == MAP:  # map<string,string>: a repeated nested entry message
                entry = msg.nested_type.add(name="".join(p.title() for p in fname.split("_")) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
                entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
                f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f".{PACKAGE}.{name}.{entry.name}"
                continue
            if ftype.startswith("*"):
                f.label, ftype = F.LABEL_REPEATED, ftype[1:]
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
            else:
                f.type, f.type_name = F.TYPE_MESSAGE, f".{PACKAGE}.{ftype}"
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return {name: message_factory.GetMessageClass(fd.message_types_by_name[name]) for name in MESSAGES}


M = _build()


class Client:
    """`client.RunPodSandbox(config=..., runtime_handler=...)` -> the reply message."""

    def __init__(self, socket_path: str, timeout: float = 60):
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.timeout = timeout
        for service, methods in SERVICES.items():
            for method, (req, resp) in methods.items():
                call = self.channel.unary_unary(
                    f"/{PACKAGE}.{service}/{method}",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=M[resp].FromString)
                setattr(self, method, self._caller(call, M[req]))

    def _caller(self, call, req_type):
        def invoke(_timeout: float | None = None, **fields):
            return call(req_type(**fields), timeout=_timeout or self.timeout)
        return invoke

    def close(self) -> None:
        self.channel.close()
