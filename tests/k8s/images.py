"""Images for the CRI tests, made here: OCI image-layout tarballs that `ctr -n k8s.io images import`
takes. busybox: Debian's static busybox with its applets and a page in /www; pause: a tiny static
program compiled with gcc that sleeps until SIGTERM/SIGINT (the sandbox's process)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile

BUSYBOX_IMAGE = "docker.io/local/busybox:1"
PAUSE_IMAGE = "docker.io/local/pause:1"
PAGE = "sockgraft-k8s-ok\n"

PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void done(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""
APPLETS = ("sh", "httpd", "nc", "cat", "sleep", "ls", "echo", "ifconfig", "ip", "netstat", "wget", "true")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, tuple[bytes | None, int, str | None]]) -> bytes:
    """An uncompressed layer tar: path -> (content, mode, symlink target); content None = directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, (content, mode, link) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, 0
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def oci_archive(path: str, name: str, files: dict, cmd: list[str]) -> str:
    """Write an OCI image layout tarball with one layer holding `files`, named `name`."""
    layer = _layer(files)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _sha(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest),
                       "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}],
    }, sort_keys=True).encode()
    entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    for blob in (layer, config, manifest):
        entries["blobs/sha256/" + _sha(blob)[7:]] = blob
    with tarfile.open(path, "w") as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for n, data in entries.items():
            info = tarfile.TarInfo(n)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _dirs(*names: str) -> dict:
    return {n: (None, 0o755, None) for n in names}


def busybox_archive(workdir: str) -> str:
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    files = _dirs("bin", "etc", "tmp", "proc", "sys", "dev", "www", "var", "var/run")
    files["tmp"] = (None, 0o1777, None)
    files["bin/busybox"] = (bb, 0o755, None)
    for a in APPLETS:
        files[f"bin/{a}"] = (None, 0o777, "busybox")
    files["www/index.html"] = (PAGE.encode(), 0o644, None)
    files["etc/passwd"] = (b"root:x:0:0:root:/:/bin/sh\n", 0o644, None)
    files["etc/group"] = (b"root:x:0:\n", 0o644, None)
    return oci_archive(os.path.join(workdir, "busybox.tar"), BUSYBOX_IMAGE, files, ["sh"])


def pause_archive(workdir: str) -> str:
    src = os.path.join(workdir, "pause.c")
    exe = os.path.join(workdir, "pause")
    with open(src, "w") as f:
        f.write(PAUSE_C.replace("#include <stdlib.h>", "#include <stdlib.h>\n#include <sys/wait.h>"))
    p = subprocess.run(["gcc", "-static", "-O2", "-o", exe, src], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"gcc could not build the pause program: {p.stderr.strip()}")
    with open(exe, "rb") as f:
        binary = f.read()
    files = {"pause": (binary, 0o755, None), **_dirs("dev", "proc", "sys", "etc")}
    return oci_archive(os.path.join(workdir, "pause.tar"), PAUSE_IMAGE, files, ["/pause"])


NGINX_IMAGE = "docker.io/local/nginx:1"
NGINX_CONF = """user root;
worker_processes 1;
daemon off;
error_log stderr;
pid /tmp/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen 8080;
        listen [::]:8080;
        location / { return 200 "sockgraft-k8s-nginx-ok-0123456789-0123456789-0123456789-01234567\\n"; }
        location = /status { stub_status; }
    }
}
"""


def _ldd(binary: str) -> list[str]:
    p = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30, check=True)
    out = []
    for line in p.stdout.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            out.append(path)
    return out


def nginx_archive(workdir: str, binary: str = "/usr/sbin/nginx") -> str:
    """Debian's nginx with the libraries it links (as ldd finds them) and a one-server config
    (port 8080 on 0.0.0.0 and [::], 64-byte answers, stub_status): for the hostPort benchmark."""
    files = _dirs("bin", "etc", "etc/nginx", "tmp", "proc", "sys", "dev", "run", "usr", "usr/sbin", "var", "var/log",
                  "var/log/nginx", "var/lib", "var/lib/nginx", "lib", "lib64", "lib/x86_64-linux-gnu")
    files["tmp"] = (None, 0o1777, None)
    for path in [binary, *_ldd(binary)]:
        with open(os.path.realpath(path), "rb") as f:
            files[path.lstrip("/")] = (f.read(), 0o755, None)
    files["etc/nginx/nginx.conf"] = (NGINX_CONF.encode(), 0o644, None)
    files["etc/passwd"] = (b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644, None)
    files["etc/group"] = (b"root:x:0:\nnogroup:x:65534:\n", 0o644, None)
    return oci_archive(os.path.join(workdir, "nginx.tar"), NGINX_IMAGE, files,
                       [binary, "-c", "/etc/nginx/nginx.conf"])
