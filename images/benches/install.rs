//! Install speed of a 20 MB package: verify + unpack + fsync + commit into a fresh store,
//! against a plain `tar -xf` of the same rootfs payload. The last line is one JSON object.

use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::package::{self, ArtifactKind, Limits};
use gatevisor_images::store::Store;
use std::process::Command;
use std::time::Instant;

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// 20 MB of incompressible, deterministic data in 200 files of 100 KiB, in 10 directories.
fn payload(dir: &std::path::Path) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for d in 0..10 {
        let sub = dir.join(format!("usr/share/d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..20 {
            let data: Vec<u8> = (0..100 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(sub.join(format!("f{f}.bin")), data).unwrap();
        }
    }
}

fn main() {
    let work = tempfile::Builder::new()
        .prefix("gv-bench-install")
        .tempdir()
        .unwrap();
    let src = work.path().join("src");
    payload(&src);
    let mut rootfs = Vec::new();
    gatevisor_images::rootfs::pack(&src, &mut rootfs).unwrap();
    let key = SecretKey::generate().unwrap();
    let public = key.save(&work.path().join("k.key"), "bench").unwrap();
    TrustStore::new(&work.path().join("keys"))
        .trust(&public)
        .unwrap();
    let service = b"name = \"bench\"\nversion = \"1\"\n";
    let pkg = work.path().join("bench.gvpkg");
    let mut bytes = Vec::new();
    package::build(
        "bench",
        "1",
        &[
            ("service.toml", ArtifactKind::Service, service),
            ("rootfs.tar", ArtifactKind::Rootfs, &rootfs),
        ],
        &key,
        &mut bytes,
    )
    .unwrap();
    std::fs::write(&pkg, &bytes).unwrap();
    let rootfs_tar = work.path().join("rootfs.tar");
    std::fs::write(&rootfs_tar, &rootfs).unwrap();
    let mb = bytes.len() as f64 / 1e6;
    // The hashing floor: SHA-256 of the package in memory.
    let t = Instant::now();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let sha_mb_s = mb / t.elapsed().as_secs_f64();
    std::hint::black_box(d);

    let flush = || {
        // SAFETY: sync(2) takes no arguments and only schedules writeback.
        unsafe { libc::sync() }
    };
    let (mut ours, mut verify, mut plain, mut plain_sync) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let store = Store::open(
            &work.path().join(format!("store{i}")),
            TrustStore::new(&work.path().join("keys")),
            Limits::default(),
        )
        .unwrap();
        flush();
        let t = Instant::now();
        let mut steps = Vec::new();
        store
            .install(&pkg, &mut |s| steps.push((s, t.elapsed())))
            .unwrap();
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        if std::env::var("GV_BENCH_DEBUG").is_ok() {
            eprintln!("steps: {steps:?}");
        }

        let dest = work.path().join(format!("verify{i}"));
        std::fs::create_dir_all(&dest).unwrap();
        flush();
        let t = Instant::now();
        let f = std::fs::File::open(&pkg).unwrap();
        package::verify_into(
            std::io::BufReader::new(f),
            &TrustStore::new(&work.path().join("keys")),
            &Limits::default(),
            &dest,
            |_| {},
        )
        .unwrap();
        verify.push(mb / t.elapsed().as_secs_f64());

        for (durable, out_list) in [(false, &mut plain), (true, &mut plain_sync)] {
            let out = work.path().join(format!("tar{i}-{durable}"));
            std::fs::create_dir_all(&out).unwrap();
            flush();
            let t = Instant::now();
            let ok = Command::new("tar")
                .arg("-xf")
                .arg(&rootfs_tar)
                .arg("-C")
                .arg(&out)
                .status()
                .unwrap()
                .success();
            assert!(ok, "tar -xf failed");
            if durable {
                let dir = std::fs::File::open(&out).unwrap();
                use std::os::fd::AsRawFd;
                // SAFETY: syncfs on an fd we own for the duration of the call.
                unsafe { libc::syncfs(dir.as_raw_fd()) };
            }
            out_list.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (o, p, ps) = (
        median(ours.clone()),
        median(plain.clone()),
        median(plain_sync.clone()),
    );
    eprintln!("install (ms): {ours:.1?}\ntar -xf (ms): {plain:.1?}\ntar -xf + syncfs (ms): {plain_sync:.1?}");
    println!(
        "{{\"package_mb\": {mb:.1}, \"install_ms_median\": {o:.1}, \"verify_mb_per_s\": {:.0}, \"sha256_mb_per_s\": {sha_mb_s:.0}, \"tar_extract_ms_median\": {p:.1}, \"tar_extract_ratio\": {:.2}, \"tar_extract_sync_ms_median\": {ps:.1}, \"tar_extract_sync_ratio\": {:.2}}}",
        median(verify),
        o / p,
        o / ps
    );
}
