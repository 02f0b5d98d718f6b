//! Builds the guest image (guests/, its own workspace: panic = "abort", freestanding link)
//! with the same cargo, and embeds it; records the git revision for every record.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("harness/ lives in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));

    build_guest(&root, &out_dir);
    record_git_revision(&root);
}

fn build_guest(root: &Path, out_dir: &Path) {
    let guest_dir = root.join("guests");
    for path in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    for path in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("workloads").join(path).display()
        );
    }
    // A separate target directory: the outer build holds the lock on the workspace's.
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Settings meant for the host crates must not reach the freestanding guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .expect("cannot run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest image (guests/) failed"
    );
    let built = target_dir.join("release").join("hvbench-guest");
    let embedded = out_dir.join("hvbench-guest.elf");
    std::fs::copy(&built, &embedded).expect("cannot copy the guest image");
    println!("cargo:rustc-env=HVBENCH_GUEST_ELF={}", embedded.display());
}

fn record_git_revision(root: &Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let revision = match git(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .map(|s| !s.is_empty())
                .unwrap_or(false);
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=HVBENCH_GIT_REVISION={revision}");
    // The revision says "-dirty" when any source differs from it, so the script must
    // run again whenever one changes, not only when git's state does.
    for crate_dir in ["harness", "workloads", "reports"] {
        for path in ["src", "Cargo.toml"] {
            println!(
                "cargo:rerun-if-changed={}",
                root.join(crate_dir).join(path).display()
            );
        }
    }
    let git_dir = root.join(".git");
    for path in ["HEAD", "index"] {
        if git_dir.join(path).exists() {
            println!("cargo:rerun-if-changed={}", git_dir.join(path).display());
        }
    }
}
