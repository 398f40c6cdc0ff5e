//! Pulling a ~30 MB three-layer OCI image from a registry (HTTPS, basic auth; signature,
//! digests while streaming, gzip, layers applied with owners and whiteouts, flushed,
//! recorded) against the same image taken by the tools container engines use: `skopeo copy`
//! from the same registry into a layout of their own plus `umoci unpack` into a bundle, in the
//! same run. The image is built by umoci, as a vendor's would be, and pushed by skopeo into
//! Debian's `docker-registry` on loopback (the tests' registry). Also: the bytes a second
//! image on the same base adds to the store, against its own layer's. Needs root, umoci,
//! skopeo, docker-registry, htpasswd and openssl; the last line is one JSON object.

#[path = "../tests/common/registry.rs"]
#[allow(dead_code)]
mod registry;

use gatevisor_images::oci::store::disk_usage;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::oci::layer::Rules;
use gatevisor_images::oci::signature;
use gatevisor_images::oci::source::{self, Reference};
use gatevisor_images::oci::store::ImageStore;

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mib` MiB in files of 256 KiB under `dir`: half random (incompressible), half text made of
/// a small vocabulary (compressible), as binaries and data files mix in a real image.
fn fill(dir: &Path, mib: usize, seed: u64) {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "gateway ", "service ", "packet ", "verdict ", "broker ", "layer ", "flow ", "\n",
    ];
    std::fs::create_dir_all(dir).unwrap();
    for f in 0..mib * 4 {
        let data: Vec<u8> = if f % 2 == 0 {
            (0..256 * 1024).map(|_| next() as u8).collect()
        } else {
            let mut t = Vec::with_capacity(256 * 1024);
            while t.len() < 256 * 1024 {
                t.extend_from_slice(words[(next() % 8) as usize].as_bytes());
            }
            t.truncate(256 * 1024);
            t
        };
        std::fs::write(dir.join(format!("f{f}.dat")), data).unwrap();
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("{{\"skipped\": \"needs root\"}}");
        return;
    }
    let missing = registry::missing_tool().or_else(|| {
        Command::new("umoci")
            .arg("--version")
            .output()
            .is_err()
            .then_some("umoci")
    });
    if let Some(t) = missing {
        println!("{{\"skipped\": \"{t} is not installed (scripts/setup.sh)\"}}");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("gv-bench-oci")
        .tempdir()
        .unwrap();
    let w = work.path();
    // Three layers (12 + 10 + 8 MiB), the top one deleting a file of the base; a second
    // image on the same base with a 6 MiB layer of its own.
    sh(w, "umoci init --layout L && umoci new --image L:big && umoci unpack --image L:big B >/dev/null");
    fill(&w.join("B/rootfs/usr/lib/base"), 12, 1);
    sh(w, "umoci repack --image L:big B && umoci unpack --image L:big C >/dev/null && umoci tag --image L:big base");
    fill(&w.join("C/rootfs/usr/share/mid"), 10, 2);
    sh(
        w,
        "umoci repack --image L:big C && umoci unpack --image L:big D >/dev/null",
    );
    fill(&w.join("D/rootfs/srv/top"), 8, 3);
    sh(
        w,
        "rm D/rootfs/usr/lib/base/f0.dat && umoci repack --image L:big D",
    );
    sh(w, "umoci unpack --image L:base E >/dev/null");
    fill(&w.join("E/rootfs/opt/other"), 6, 4);
    sh(w, "umoci repack --image L:other E");

    let reg = registry::Registry::start(&w.join("registry"));
    let layout = |tag: &str| format!("oci:{}:{tag}", w.join("L").display());
    reg.push(&layout("big"), "bench/app:big");
    reg.push(&layout("other"), "bench/app:other");
    let access = reg.access(Some(registry::PASSWORD));

    let key = SecretKey::generate().unwrap();
    let public = key.save(&w.join("k.key"), "bench").unwrap();
    let trust = TrustStore::new(&w.join("keys"));
    trust.trust(&public).unwrap();
    let reference =
        |tag: &str| Reference::parse(&reg.reference(&format!("bench/app:{tag}"))).unwrap();
    let sign = |tag: &str| {
        let d = source::resolve(&reference(tag), &access).unwrap().digest;
        signature::sign(&key, &d).into_bytes()
    };
    let (big, other) = (sign("big"), sign("other"));
    let image_bytes = disk_usage(&w.join("L/blobs"));

    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for i in 0..RUNS {
        let root = w.join(format!("store{i}"));
        let t = Instant::now();
        let store = ImageStore::open(&root, trust.clone(), Rules::default())
            .unwrap()
            .with_registries(access.clone());
        let got = store
            .import(
                &reference("big"),
                &big,
                &|_, _| Rules::default(),
                &mut |_| {},
            )
            .unwrap();
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(got.layers_added, 3);
        let p = w.join(format!("peer{i}"));
        let t = Instant::now();
        let copy = Command::new("skopeo")
            .args([
                "copy",
                "-q",
                "--src-cert-dir",
                &reg.dir.join("certs").display().to_string(),
                "--src-creds",
                &format!("{}:{}", registry::USER, registry::PASSWORD),
                &reg.reference("bench/app:big"),
                &format!("oci:{}:big", p.display()),
            ])
            .status()
            .unwrap();
        let unpack = Command::new("umoci")
            .args([
                "unpack",
                "--image",
                &format!("{}:big", p.display()),
                &format!("{}-bundle", p.display()),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        peer.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(copy.success() && unpack.success());
        if i > 0 {
            let _ = std::fs::remove_dir_all(&root);
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_dir_all(w.join(format!("peer{i}-bundle")));
        }
    }
    // A second image on the same base, into the first store.
    let store = ImageStore::open(&w.join("store0"), trust.clone(), Rules::default())
        .unwrap()
        .with_registries(access.clone());
    let before = store.disk_bytes();
    let second = store
        .import(
            &reference("other"),
            &other,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap();
    let extra = store.disk_bytes() - before;
    let own = disk_usage(&store.layer_dir(second.record.layers.last().unwrap()));
    let (o, p) = (median(ours), median(peer));
    println!(
        "{}",
        serde_json::json!({
            "image_mib": 30,
            "layout_blob_bytes_both_images": image_bytes,
            "layers": 3,
            "source": "docker-registry on loopback (HTTPS, basic auth), pushed by skopeo",
            "pull_install_ms_median": (o * 10.0).round() / 10.0,
            "skopeo_umoci_ms_median": (p * 10.0).round() / 10.0,
            "ratio": ((o / p) * 1000.0).round() / 1000.0,
            "shared_base_extra_bytes": extra,
            "second_image_own_layer_bytes": own,
            "shared_base_extra_ratio": ((extra as f64 / own as f64) * 1000.0).round() / 1000.0,
            "runs": RUNS,
        })
    );
}
