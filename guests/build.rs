//! Links the guest as a static, non-PIE ELF at the addresses of `link.ld`.
//! The installed host target is enough: nothing is downloaded and no RUSTFLAGS are needed.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    for arg in [
        format!("-T{dir}/link.ld"),
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,noexecstack".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
