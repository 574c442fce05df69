#!/bin/sh
# Install sockgraft's node pieces from the graftd image onto a Kubernetes node: the DaemonSet's
# init container runs it with the node's / mounted at /host. What containerd executes on the node
# must not depend on the image, so the image's Python (with sockgraft installed) is copied whole:
#   /opt/sockgraft/                        the image's Python prefix (bin/python3, lib/...)
#   /usr/local/bin/graft-runtime           OCI runtime wrapper (containerd's BinaryName)
#   /opt/cni/bin/graft                     the graft CNI plugin
#   /etc/cni/net.d/graft/10-graft.conflist the graft handler's network (cni_conf_dir)
# Each is replaced atomically; running it again updates them. Settings (environment):
#   NODE_ROOT (/host)  SOCKGRAFT_PREFIX (this Python's sys.prefix)  SOCKGRAFT_DIR (/opt/sockgraft)
#   RUNTIME_BIN_DIR (/usr/local/bin)  CNI_BIN_DIR (/opt/cni/bin)  CNI_CONF_DIR (/etc/cni/net.d/graft)
#   CONFLIST (graft.conflist beside this script, or /etc/sockgraft/graft.conflist in the image)
set -eu
NODE_ROOT=${NODE_ROOT-/host}
PREFIX=${SOCKGRAFT_PREFIX:-$(python3 -c 'import sys; print(sys.prefix)')}
DIR=${SOCKGRAFT_DIR:-/opt/sockgraft}
RUNTIME_BIN_DIR=${RUNTIME_BIN_DIR:-/usr/local/bin}
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
CNI_CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d/graft}
here=$(dirname "$0")
CONFLIST=${CONFLIST:-$( [ -f "$here/graft.conflist" ] && echo "$here/graft.conflist" || echo /etc/sockgraft/graft.conflist )}
py=$(cd "$PREFIX/bin" && ls python3.[0-9]* 2>/dev/null | grep -E '^python3\.[0-9]+$' | head -n1)
[ -n "$py" ] || { echo "install-node: no python3.X in $PREFIX/bin" >&2; exit 1; }

mkdir -p "$NODE_ROOT$DIR.new" "$NODE_ROOT$RUNTIME_BIN_DIR" "$NODE_ROOT$CNI_BIN_DIR" "$NODE_ROOT$CNI_CONF_DIR"
rm -rf "$NODE_ROOT$DIR.new"
cp -a "$PREFIX/." "$NODE_ROOT$DIR.new"
rm -rf "$NODE_ROOT$DIR.old"
[ -e "$NODE_ROOT$DIR" ] && mv "$NODE_ROOT$DIR" "$NODE_ROOT$DIR.old"
mv "$NODE_ROOT$DIR.new" "$NODE_ROOT$DIR"
rm -rf "$NODE_ROOT$DIR.old"

# a bare environment (CNI plugins get little more than CNI_*): everything spelled out
shim() {  # shim PATH PYTHON-CODE
  cat > "$1.new" <<SHIM
#!/bin/sh
PYTHONHOME=$DIR LD_LIBRARY_PATH=$DIR/lib PYTHONNOUSERSITE=1 exec $DIR/bin/$py -c '$2' "\$@"
SHIM
  chmod 755 "$1.new"
  mv "$1.new" "$1"
}
shim "$NODE_ROOT$RUNTIME_BIN_DIR/graft-runtime" "import sys; sys.argv[0] = \"graft-runtime\"; from sockgraft.runtime.wrapper import main; main()"
shim "$NODE_ROOT$CNI_BIN_DIR/graft" "import sys; sys.argv[0] = \"graft\"; from sockgraft.cni.plugin import main; main()"
cp "$CONFLIST" "$NODE_ROOT$CNI_CONF_DIR/10-graft.conflist.new"
mv "$NODE_ROOT$CNI_CONF_DIR/10-graft.conflist.new" "$NODE_ROOT$CNI_CONF_DIR/10-graft.conflist"
echo "install-node: sockgraft in $DIR, graft-runtime in $RUNTIME_BIN_DIR, CNI plugin graft in $CNI_BIN_DIR, conflist in $CNI_CONF_DIR"
