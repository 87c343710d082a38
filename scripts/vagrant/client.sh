#!/usr/bin/env bash
# Vagrant provisioner of the client VM (runs as root inside it; the Vagrantfile passes the arguments):
#   client.sh CLIENT_IP NODE_IP[,NODE_IP...]
# Installs the clients a FAE deployment is called with: the `fae` CLI (ping, call, bench) built in release,
# Python and PHP Thrift clients generated from idl/fae.thrift with the clients/ helpers beside them; then
# pings every node over the lab network, which exercises each node's XDP path end to end.
set -euo pipefail
FAE_SRC=${FAE_SRC:-/vagrant}
# shellcheck source=common.sh
. "$FAE_SRC/scripts/vagrant/common.sh"

[ $# -ge 2 ] || die "usage: client.sh CLIENT_IP NODE_IP[,NODE_IP...]"
client_ip=$1
IFS=, read -r -a nodes <<<"$2"

# 1. `fae` in release. It shares its crate with faed, whose build compiles the XDP program, so the client
#    needs the same toolchains as a node.
install_build_deps
install_rust
build_release fae

# 2. Thrift clients as the services that call FAE use them: Debian's compiler (0.17) and runtime libraries
#    for Python and PHP, plus php-cli to run PHP scripts.
apt_install thrift-compiler python3-thrift php-cli php-thrift

# 3. Generated code and the thin helpers (pool of hosts, timeouts, one retry on connect, a Context per call)
#    under /opt/fae: gen-py/ and gen-php/ from the IDL, and clients/python, clients/php from the repository.
install -d -m 0755 /opt/fae /opt/fae/clients
rm -rf /opt/fae/gen-py /opt/fae/gen-php
install -d -m 0755 /opt/fae/gen-py /opt/fae/gen-php
thrift --gen py -out /opt/fae/gen-py "$FAE_SRC/idl/fae.thrift"
thrift --gen php -out /opt/fae/gen-php "$FAE_SRC/idl/fae.thrift"
cp -r "$FAE_SRC/clients/python" "$FAE_SRC/clients/php" /opt/fae/clients/
cat >/etc/profile.d/fae-clients.sh <<EOF
# The Vagrant lab's FAE clients: Python finds the generated code and the helper on PYTHONPATH.
export PYTHONPATH=/opt/fae/gen-py:/opt/fae/clients/python\${PYTHONPATH:+:\$PYTHONPATH}
export FAE_NODES="$(printf '%s:9001 ' "${nodes[@]}" | sed 's/ $//')"
EOF

# 4. The lab NIC: TX checksum offload off. A userspace TCP stack (smoltcp behind AF_XDP on the nodes) cannot
#    accept a partially computed L4 checksum; on veth that is what the kernel sends (TOOLCHAIN.md pitfall 1).
#    Virtual NICs normally complete the checksum before the peer sees it, so this is a safeguard, made to
#    survive reboots with a oneshot unit.
iface=$(lab_iface "$client_ip")
[ -n "$iface" ] || die "no interface holds $client_ip (is the private network up?)"
cat >/etc/systemd/system/fae-lab-nic.service <<EOF
# Written by scripts/vagrant/client.sh: TX checksum offload off on the lab NIC ($iface, $client_ip).
[Unit]
Description=fae lab: full checksums on the lab NIC
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/sbin/ethtool -K $iface tx off
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable --now fae-lab-nic.service >/dev/null 2>&1 || ethtool -K "$iface" tx off

# 5. End to end: every node answers `fae ping` over the lab network (through its XDP program, AF_XDP socket
#    and smoltcp), and the Python client imports.
failed=0
for ip in "${nodes[@]}"; do
    if out=$(timeout 10 fae ping "$ip:9001" 2>&1); then
        log "node $ip: $out"
    else
        log "node $ip: NO ANSWER ($out)"
        failed=1
    fi
done
PYTHONPATH=/opt/fae/gen-py:/opt/fae/clients/python /usr/bin/python3 -c 'import fae_client' ||
    die "the Python helper does not import"
[ $failed -eq 0 ] || die "some nodes did not answer (provision them first: vagrant up node1 node2 node3)"
log "client ready: fae, /opt/fae/gen-py, /opt/fae/gen-php, /opt/fae/clients; nodes ${nodes[*]}"
