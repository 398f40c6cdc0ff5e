//! Forged packages for hostile-input tests (shared by `images/tests` and the daemon's tests).

use gatevisor_images::package;

/// The signed package `signed` with its `manifest.sig` naming `id` instead of the real key id
/// (the signature itself unchanged).
pub fn with_signature_id(signed: &[u8], id: &str) -> Vec<u8> {
    let mut ar = tar::Archive::new(signed);
    let mut b = tar::Builder::new(Vec::new());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if name == package::SIGNATURE {
            let text = String::from_utf8(data).unwrap();
            let sig = text.split_whitespace().nth(2).unwrap().to_string();
            data = format!("ed25519 {id} {sig}\n").into_bytes();
        }
        package::append(&mut b, &name, &data, 0o644).unwrap();
    }
    b.into_inner().unwrap()
}
