//! Link-time settings for the `gatevisor` binary only.

fn main() {
    // Pack the binary's relative relocations (DT_RELR): a PIE keeps its address-space layout
    // randomisation while ~170 KB of `.rela.dyn` shrinks to a few KB, which counts on a
    // gateway's flash. Needs glibc ≥ 2.36 and binutils ≥ 2.38 (Debian bookworm and later).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
