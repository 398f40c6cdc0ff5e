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
        // Identical functions folded into one (LLD's identical code folding): generic code
        // instantiated alike in several crates (serde visitors, the TOML deserializer of each
        // crate's types) is ~57 KB of the binary. Rust promises no unique function
        // addresses, so folding even those whose address is taken is sound for Rust code.
        // Only where the linker is LLD: rustc's default for this target since 1.90.
        if links_with_lld() {
            println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
        } else {
            println!("cargo:warning=not linking with LLD: identical code is not folded (the binary is ~57 KB larger)");
        }
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// rustc links this target with its own LLD (1.90 and later on x86_64 Linux) and no other
/// linker is configured.
fn links_with_lld() -> bool {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu"
        || std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
    {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .and_then(|v| v.split('.').nth(1)?.parse::<u32>().ok())
        .is_some_and(|minor| minor >= 90)
}
