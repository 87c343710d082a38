//! Builds the XDP program (../ebpf) for bpfel-unknown-none with aya-build, on the pinned nightly and
//! bpf-linker (scripts/install-bpf-toolchain installs both). Without them the crate still builds, for the
//! kernel path only: `cfg(fae_no_ebpf)` is set and faed, asked for XDP, says what is missing.

use std::path::Path;
use std::process::Command;

/// The toolchain that builds the eBPF object: `FAE_EBPF_TOOLCHAIN`, or the machine's `nightly` (1.97 on
/// this project's machines; scripts/install-bpf-toolchain links bpf-linker against its libLLVM).
fn toolchain() -> String {
    std::env::var("FAE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into())
}

fn missing_toolchain(toolchain: &str) -> Option<String> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        return Some("bpf-linker is not installed (or is stale)".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match sysroot {
        None => Some(format!("the {toolchain} Rust toolchain is not installed")),
        Some(s)
            if !Path::new(&s)
                .join("lib/rustlib/src/rust/library/core")
                .exists() =>
        {
            Some(format!(
                "the {toolchain} toolchain has no rust-src component"
            ))
        }
        Some(_) => None,
    }
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fae_no_ebpf)");
    println!("cargo:rerun-if-env-changed=FAE_NO_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=FAE_EBPF_TOOLCHAIN");
    let toolchain = toolchain();
    let skip = std::env::var_os("FAE_NO_EBPF").is_some_and(|v| v == "1");
    let why = if skip {
        Some("FAE_NO_EBPF=1".to_owned())
    } else {
        missing_toolchain(&toolchain)
    };
    if let Some(why) = why {
        println!("cargo:warning=building without the XDP program: {why}; run scripts/install-bpf-toolchain");
        println!("cargo:rustc-cfg=fae_no_ebpf");
        println!("cargo:rustc-env=FAE_NO_EBPF_REASON={why}");
        return;
    }
    let package = aya_build::Package {
        name: "fae-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)) {
        panic!("building the XDP program failed: {e:#}");
    }
}
