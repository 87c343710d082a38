# Sourced by scripts/vagrant/node.sh and client.sh (the Vagrant lab's provisioners; they run as root inside
# the VMs, never on the host). Everything here is idempotent: `vagrant provision` re-runs it on a built VM.
# shellcheck shell=bash

set -euo pipefail

# The synced copy of the repository (the Vagrantfile rsyncs the work tree there, without target/ and .git/).
FAE_SRC=${FAE_SRC:-/vagrant}
# Toolchains, pinned as ../../shared/TOOLCHAIN.md describes: stable 1.95 for the daemon, and the one nightly
# whose libLLVM bpf-linker is built against (rustc 1.97.0-nightly e50aa6fba 2026-05-19, which rustup ships
# as the channel "nightly-2026-05-20"). A different nightly means a different libLLVM file and a rebuilt
# bpf-linker; keep this in step with scripts/install-bpf-toolchain and netstack/build.rs.
FAE_STABLE=${FAE_STABLE:-1.95.0}
FAE_NIGHTLY=${FAE_NIGHTLY:-nightly-2026-05-20}
# System-wide rustup (root builds during provisioning; CARGO_HOME must be writable because libxdp-sys builds
# its bundled xdp-tools inside $CARGO_HOME/registry/src).
export RUSTUP_HOME=/opt/rust/rustup
export CARGO_HOME=/opt/rust/cargo
export PATH="$CARGO_HOME/bin:$PATH"
# Build outside the synced folder, so that `vagrant rsync` never sees (or deletes) build output.
export CARGO_TARGET_DIR=/var/cache/fae/target
export DEBIAN_FRONTEND=noninteractive

log() { echo "==> fae provision: $*"; }
die() {
    echo "==> fae provision: ERROR: $*" >&2
    exit 1
}

# apt_install PKG...: install what is missing (one `apt-get update` per provisioning run).
apt_updated=""
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    [ -n "$apt_updated" ] || {
        apt-get update -qq
        apt_updated=1
    }
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Build dependencies of the whole workspace, both VMs (the `fae` binary lives in the same crate as faed, whose
# build script compiles the XDP program, so the client needs the same toolchain to build it):
#  - gcc, make, pkg-config, zlib1g-dev: C parts of crates (libbpf-sys, libxdp-sys);
#  - clang, libelf-dev, m4, libpcap-dev: what libxdp-sys / libbpf-sys need to build the bundled xdp-tools
#    (TOOLCHAIN.md, "Debian packages that xsk-rs needs");
#  - curl, ca-certificates: rustup's installer;
#  - ethtool, iproute2, bpftool, tcpdump: queue counts, offloads, seeing the attached XDP program, debugging.
install_build_deps() {
    apt_install gcc make pkg-config zlib1g-dev clang libelf-dev m4 libpcap-dev \
        curl ca-certificates ethtool iproute2 bpftool tcpdump procps
}

# Rust by rustup (Debian 12 has no rustup package, and its rustc 1.63 is far too old), stable as default,
# plus the pinned nightly with rust-src and bpf-linker built against that nightly's libLLVM: exactly the
# procedure of TOOLCHAIN.md, which scripts/install-bpf-toolchain implements (idempotent; it rebuilds a stale
# bpf-linker).
install_rust() {
    if ! [ -x "$CARGO_HOME/bin/rustup" ]; then
        log "installing rustup ($FAE_STABLE)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$FAE_STABLE"
    fi
    rustup toolchain list | grep -q "^$FAE_STABLE" || rustup toolchain install "$FAE_STABLE" --profile minimal
    rustup default "$FAE_STABLE" >/dev/null
    # Let interactive logins (vagrant ssh, then sudo -i) use the same toolchains.
    cat >/etc/profile.d/fae-rust.sh <<EOF
export RUSTUP_HOME=$RUSTUP_HOME CARGO_HOME=$CARGO_HOME CARGO_TARGET_DIR=$CARGO_TARGET_DIR
export PATH=$CARGO_HOME/bin:\$PATH
EOF
    log "eBPF toolchain: $FAE_NIGHTLY + rust-src + bpf-linker"
    FAE_EBPF_TOOLCHAIN="$FAE_NIGHTLY" bash "$FAE_SRC/scripts/install-bpf-toolchain"
}

# build_release BIN...: cargo build --release of the given binaries from the synced sources, and install them
# into /usr/local/bin. Fails if the XDP program was left out (netstack/build.rs then warns and builds a
# kernel-path-only faed, which would make the lab silently test the wrong path).
build_release() {
    local bins=() b logf=/var/log/fae-build.log
    for b in "$@"; do bins+=(--bin "$b"); done
    mkdir -p "$CARGO_TARGET_DIR"
    log "cargo build --release ${bins[*]} (log: $logf)"
    if ! (cd "$FAE_SRC" && FAE_EBPF_TOOLCHAIN="$FAE_NIGHTLY" cargo build --release --locked "${bins[@]}") \
        >"$logf" 2>&1; then
        tail -n 40 "$logf" >&2
        die "cargo build failed (whole log: $logf)"
    fi
    if grep -q 'building without the XDP program' "$logf"; then
        die "the XDP program was not built: $(grep -m1 -o 'building without the XDP program.*' "$logf")"
    fi
    for b in "$@"; do install -m 0755 "$CARGO_TARGET_DIR/release/$b" "/usr/local/bin/$b"; done
}

# lab_iface IP: the name of the interface holding IP (the lab NIC is the VM's second one, but its name
# depends on the provider and NIC model: eth1, enp0s8, ens6 ...; the address is what the Vagrantfile fixes).
lab_iface() {
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}
