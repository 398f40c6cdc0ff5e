//! Images pulled from a real registry: Debian's `docker-registry` (the CNCF distribution
//! server) on loopback with TLS (a test CA made by openssl) and htpasswd basic auth; the
//! images built by umoci and pushed by skopeo. Wrong or missing credentials, a CA the gateway
//! does not know, an unknown tag, an unsigned digest, a tampered layer, a missing platform
//! and a layer that escapes its root are each refused with their reason and nothing stored.
//! Needs root and docker-registry, htpasswd, openssl, umoci, skopeo (`scripts/setup.sh`);
//! skips with a printed reason otherwise.

mod common;

use common::registry::{Auth, Registry, PASSWORD};
use common::{assert_empty, have_tools, sh, Env};
use gatevisor_images::oci::layer::Rules;
use gatevisor_images::oci::registry::Registries;
use gatevisor_images::oci::source::{self, Reference};
use gatevisor_images::oci::OciError;

fn have_registry(test: &str) -> bool {
    if !have_tools(test) {
        return false;
    }
    if let Some(t) = common::registry::missing_tool() {
        eprintln!("SKIP {test}: {t} is not installed (scripts/setup.sh installs it)");
        return false;
    }
    true
}

#[test]
fn images_pull_from_a_registry_over_tls_with_credentials_and_share_their_layers() {
    let test = "images_pull_from_a_registry_over_tls_with_credentials_and_share_their_layers";
    if !have_registry(test) {
        return;
    }
    let env = Env::new();
    env.build_images();
    let reg = Registry::start(&env.path("reg"));
    let l = env.path("L").display().to_string();
    reg.push(&format!("oci:{l}:base"), "gv/app:base");
    reg.push(&format!("oci:{l}:upper"), "gv/app:upper");
    let access = reg.access(Some(PASSWORD));
    let store = env.store("store").with_registries(access.clone());

    let upper = reg.reference("gv/app:upper");
    let sig = env.sign_with(&upper, &access);
    let got = store
        .import(
            &Reference::parse(&upper).unwrap(),
            &sig,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!((got.layers_added, got.layers_shared), (2, 0));
    assert_eq!(got.record.references, vec![upper.clone()]);
    let user = got.config.config.as_ref().and_then(|c| c.user.clone());
    assert_eq!(user.as_deref(), Some("1000:1000"));
    // The upper layer's whiteouts are applied: `etc/old` is gone, `data/new` is there.
    let rec = &got.record;
    assert!(store.read_file(rec, "etc/old", 64).is_none());
    assert_eq!(
        store.read_file(rec, "data/new", 64).as_deref(),
        Some(&b"new\n"[..])
    );

    // The base, by its manifest digest: its one layer is the one stored already.
    let base_digest = source::resolve(
        &Reference::parse(&reg.reference("gv/app:base")).unwrap(),
        &access,
    )
    .unwrap()
    .digest;
    let by_digest = reg.reference(&format!("gv/app@{base_digest}"));
    let base = env.import_with(&store, &by_digest, &access).unwrap();
    assert_eq!((base.layers_added, base.layers_shared), (0, 1));
    assert_eq!(base.record.digest, base_digest);
    assert_eq!(store.list().len(), 2);
}

#[test]
fn registry_pulls_with_bad_access_or_bad_images_are_refused_and_store_nothing() {
    let test = "registry_pulls_with_bad_access_or_bad_images_are_refused_and_store_nothing";
    if !have_registry(test) {
        return;
    }
    let env = Env::new();
    env.build_images();
    let reg = Registry::start(&env.path("reg"));
    let l = env.path("L").display().to_string();
    reg.push(&format!("oci:{l}:upper"), "gv/app:upper");
    let good = reg.access(Some(PASSWORD));
    let upper = reg.reference("gv/app:upper");
    let sig = env.sign_with(&upper, &good);
    let pull = |r: &str, access: &Registries, sig: &[u8]| {
        let store = env.store("store").with_registries(access.clone());
        let e = store
            .import(
                &Reference::parse(r).unwrap(),
                sig,
                &|_, _| Rules::default(),
                &mut |_| {},
            )
            .unwrap_err();
        assert!(store.list().is_empty(), "{e}");
        store.gc().unwrap();
        assert_empty(&env, "store");
        e
    };

    // Wrong credentials, none, and a CA the gateway does not know.
    let e = pull(&upper, &reg.access(Some("not-the-password")), &sig);
    assert!(
        matches!(&e, OciError::AccessDenied { why, .. } if why.contains("refused the credentials of \"gv-operator\"")),
        "{e}"
    );
    let e = pull(&upper, &reg.access(None), &sig);
    assert!(
        matches!(&e, OciError::AccessDenied { why, .. } if why.contains("wants credentials and none are configured")),
        "{e}"
    );
    let e = pull(&upper, &Registries::default(), &sig);
    assert!(
        matches!(&e, OciError::Registry { why, .. } if why.contains("UnknownIssuer")),
        "{e}"
    );
    // A tag the registry does not have: what the registry said.
    let e = pull(&reg.reference("gv/app:nope"), &good, &sig);
    assert!(
        matches!(&e, OciError::Registry { status: Some(404), why, .. } if why.contains("manifest unknown")),
        "{e}"
    );
    // A digest that is not the operator's: the signature of another image.
    reg.push(&format!("oci:{l}:base"), "gv/app:base");
    let other = env.sign_with(&reg.reference("gv/app:base"), &good);
    let e = pull(&upper, &good, &other);
    assert!(matches!(e, OciError::Signature { .. }), "{e}");

    // A missing platform, and a layer that escapes its root, pushed as they are.
    sh(
        env.dir.path(),
        "umoci config --image L:base --architecture arm64 --tag arm
         mkdir -p esc/x && echo pwned > esc/x/evil
         tar -C esc/x -P -cf esc.tar ../x/evil
         umoci raw add-layer --image L:base esc.tar --tag esc",
    );
    reg.push(&format!("oci:{l}:arm"), "gv/app:arm");
    reg.push(&format!("oci:{l}:esc"), "gv/app:esc");
    let e = pull(&reg.reference("gv/app:arm"), &good, &sig);
    assert!(
        matches!(&e, OciError::NoPlatform { available, .. } if available.contains("linux/arm64")),
        "{e}"
    );
    let esc = reg.reference("gv/app:esc");
    let e = pull(&esc, &good, &env.sign_with(&esc, &good));
    assert!(
        matches!(&e, OciError::Unsafe { why, .. } if why.contains("`..` in the path")),
        "{e}"
    );

    // A tampered layer: one byte of the upper layer's blob changed in the registry's storage.
    let resolved = source::resolve(&Reference::parse(&upper).unwrap(), &good).unwrap();
    let top = resolved.layers.last().unwrap().digest.clone().unwrap();
    let blob = reg.dir.join(format!(
        "storage/docker/registry/v2/blobs/sha256/{}/{}/data",
        &top.hex()[..2],
        top.hex()
    ));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let e = pull(&upper, &good, &sig);
    assert!(
        matches!(&e, OciError::DigestMismatch { what, .. } if what.contains(&top.to_string())),
        "{e}"
    );
}

#[test]
fn a_registry_under_token_auth_is_pulled_from_with_a_token_won_by_the_credentials() {
    let test = "a_registry_under_token_auth_is_pulled_from_with_a_token_won_by_the_credentials";
    if !have_registry(test) {
        return;
    }
    let env = Env::new();
    env.build_images();
    let reg = Registry::start_with(&env.path("reg"), Auth::Token);
    let l = env.path("L").display().to_string();
    reg.push(&format!("oci:{l}:upper"), "gv/app:upper");
    let tokens = reg.tokens.as_ref().unwrap();
    let upper = reg.reference("gv/app:upper");
    let good = reg.access(Some(PASSWORD));

    // The wrong password wins no token: refused, nothing stored.
    let sig = env.sign_with(&upper, &good);
    let refused_before = tokens.refused.load(std::sync::atomic::Ordering::SeqCst);
    let bad = env.store("bad").with_registries(reg.access(Some("wrong")));
    let e = bad
        .import(
            &Reference::parse(&upper).unwrap(),
            &sig,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(&e, OciError::AccessDenied { why, .. } if why.contains("token service refused the credentials")),
        "{e}"
    );
    assert!(tokens.refused.load(std::sync::atomic::Ordering::SeqCst) > refused_before);
    assert_empty(&env, "bad");

    // The right one: one token for the whole pull (manifest, config and every layer).
    let issued_before = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    let store = env.store("store").with_registries(good.clone());
    let got = env.import_with(&store, &upper, &good).unwrap();
    assert_eq!((got.layers_added, got.layers_shared), (2, 0));
    // sign_with resolved once, import once: a token each.
    assert_eq!(
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst) - issued_before,
        2
    );
    assert_eq!(
        store.read_file(&got.record, "data/new", 64).as_deref(),
        Some(&b"new\n"[..])
    );
}
