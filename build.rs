//! Link-time settings for the `gatevisor` binary only.

fn main() {
    // Pack the binary's relative relocations (DT_RELR): a PIE keeps its address-space layout
    // randomisation while ~170 KB of `.rela.dyn` shrinks to a few KB, which counts on a
    // gateway's flash. Needs glibc ≥ 2.36 and binutils ≥ 2.38 (Debian bookworm and later).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    // A release binary aborts on panic (`panic = "abort"`): nothing ever unwinds, so its
    // unwind tables (`.eh_frame`, ~570 KB, a seventh of the binary) and the exception tables
    // they point to (`.gcc_except_table`) are dropped at link time.
    // A panic still prints its message; only `RUST_BACKTRACE` backtraces are lost (debug
    // builds, which tests run, keep them). The linker script only adds to the default one.
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        let out =
            std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let script = out.join("no-unwind-tables.ld");
        std::fs::write(
            &script,
            "SECTIONS { /DISCARD/ : { *(.eh_frame) *(.eh_frame_hdr) *(.gcc_except_table*) } } INSERT AFTER .text;\n",
        )
        .expect("OUT_DIR is writable");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}
