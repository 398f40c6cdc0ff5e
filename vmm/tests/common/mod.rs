//! What the VMM's tests share.

/// Whether /dev/kvm opens here; when it does not, says that `test` is skipped and why.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped {test}: /dev/kvm: {e}");
            false
        }
    }
}
