#!/usr/bin/env bash
# Vagrant provisioner of a faed node (runs as root inside the VM; the Vagrantfile passes the arguments):
#   node.sh NODE_ID LAB_IP [LISTENER_MODE]
# Builds faed from the synced sources, installs it as a systemd service running as the unprivileged user
# `fae`, and starts it with the XDP data path on the lab NIC (the interface holding LAB_IP).
# Idempotent: `vagrant provision` rebuilds from the current sources and restarts faed.
set -euo pipefail
FAE_SRC=${FAE_SRC:-/vagrant}
# shellcheck source=common.sh
. "$FAE_SRC/scripts/vagrant/common.sh"

[ $# -ge 2 ] || die "usage: node.sh NODE_ID LAB_IP [kernel|xdp|both]"
node_id=$1
lab_ip=$2
mode=${3:-xdp}
rpc_port=9001
admin_port=9101

# 1. Toolchains and build deps, then faed (and fae, for checks on the node) in release.
install_build_deps
install_rust
build_release faed fae

# 2. Kernel tuning for an RPC server (accept backlog, socket buffers, ports): the same file production uses.
install -m 0644 "$FAE_SRC/etc/sysctl.d/90-fae.conf" /etc/sysctl.d/90-fae.conf
sysctl -q -p /etc/sysctl.d/90-fae.conf

# 3. The unprivileged service user: faed gets its XDP/AF_XDP rights from the unit's capabilities, not root.
id -u fae >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin fae

# 4. The lab NIC: found by the address the Vagrantfile gave it, since its name depends on provider and NIC.
iface=$(lab_iface "$lab_ip")
[ -n "$iface" ] || die "no interface holds $lab_ip (is the private network up?)"
log "lab NIC: $iface ($lab_ip), $(ethtool -i "$iface" 2>/dev/null | sed -n 's/^driver: //p') driver"
# One AF_XDP socket per RX queue: show what the NIC has (VM NICs often have just one).
ethtool -l "$iface" 2>/dev/null | sed -n '/Current/,$p' | sed 's/^/    /' || true

# 5. The node's config. Only what differs from the built-in defaults (etc/faed.toml lists them all):
#    RPC and admin on the lab address, a distinct node id and snowflake worker id per node, and the
#    listener: XDP on the lab NIC, every queue, native mode if the driver has it else generic ("auto").
install -d -m 0755 /etc/fae
# The admin port is on the lab network: actions need a token (kept across re-provisioning).
if [ ! -s /etc/fae/admin.token ]; then
    install -m 0640 -o root -g fae /dev/null /etc/fae/admin.token
    head -c 24 /dev/urandom | base64 >/etc/fae/admin.token
fi
cat >/etc/fae/faed.toml.new <<EOF
# Written by scripts/vagrant/node.sh for the Vagrant lab: node $node_id. Re-provisioning overwrites it.
[server]
listen = "$lab_ip:$rpc_port"

[admin]
listen = "$lab_ip:$admin_port"
token_file = "/etc/fae/admin.token"

[node]
id = $node_id

[idgen]
worker_id = $node_id

[listener]
mode = "$mode"
interface = "$iface"
queues = 0
xdp_mode = "auto"
EOF
/usr/local/bin/faed --check-config /etc/fae/faed.toml.new || die "faed rejects the generated config"
mv /etc/fae/faed.toml.new /etc/fae/faed.toml
chmod 0644 /etc/fae/faed.toml

# 6. The service (etc/faed.service): restart, so that a re-provision runs the binary just built.
install -m 0644 "$FAE_SRC/etc/faed.service" /etc/systemd/system/faed.service
systemctl daemon-reload
systemctl enable faed.service >/dev/null 2>&1
systemctl restart faed.service

# 7. Check: faed is up (admin HTTP answers; it is served by the kernel), and the XDP program is attached.
#    An RPC check from this node itself would go over loopback and miss the XDP path: the client VM's
#    provisioner pings every node over the lab network instead.
for _ in $(seq 50); do
    curl -fsS "http://$lab_ip:$admin_port/metrics" >/dev/null 2>&1 && break
    sleep 0.2
done
systemctl is-active --quiet faed.service || {
    journalctl -u faed.service -n 30 --no-pager >&2
    die "faed is not running"
}
curl -fsS "http://$lab_ip:$admin_port/metrics" >/dev/null || die "faed's admin endpoint does not answer"
if [ "$mode" != kernel ]; then
    ip -d link show dev "$iface" | grep -q 'prog/xdp' || die "no XDP program on $iface"
    log "XDP on $iface: $(ip -d link show dev "$iface" | grep -oE ' xdp[a-z]*|prog/xdp id [0-9]+' | xargs)"
fi
log "node $node_id ready: faed on $lab_ip:$rpc_port ($mode path), admin http://$lab_ip:$admin_port/"
