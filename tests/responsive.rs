//! The daemon keeps answering while a huge package installs and while many clients hold idle
//! connections: the install runs on a worker, each connection on its own thread with a
//! deadline for its request. Needs root (the daemon's state and the package's rootfs).

mod common;
use common::*;
use gatevisor::api::Request;
use gatevisor::client::Client;
use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::package::{self, ArtifactKind};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A rootfs tar of `n` empty files in directories of 1,000.
fn many_files(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(n * 1024 + (1 << 20)));
    for d in 0..n.div_ceil(1000) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("d{d}"), std::io::empty())
            .unwrap();
    }
    for i in 0..n {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        b.append_data(&mut h, format!("d{}/f{i}", i / 1000), std::io::empty())
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

#[test]
fn list_answers_within_100_ms_during_a_200000_file_install_and_1000_idle_clients() {
    if !need_root("list_answers_within_100_ms_during_a_200000_file_install_and_1000_idle_clients") {
        return;
    }
    let d = Daemon::start_with_keys();
    let key = SecretKey::generate().unwrap();
    let public = key.save(&d.dir.path().join("acme.key"), "acme").unwrap();
    TrustStore::new(&d.dir.path().join("keys"))
        .trust(&public)
        .unwrap();
    let service = br#"name = "t-big"
version = "1.0.0"
runtime = "lxc"
image = "package"
command = ["/bin/sh"]
[resources]
memory_mib = 32
"#;
    let rootfs = many_files(200_000);
    let pkg = d.dir.path().join("big.gvpkg");
    package::build(
        "t-big",
        "1.0.0",
        &[
            ("service.toml", ArtifactKind::Service, service),
            ("rootfs.tar", ArtifactKind::Rootfs, &rootfs),
        ],
        &key,
        std::fs::File::create(&pkg).unwrap(),
    )
    .unwrap();
    drop(rootfs);

    // 1,000 clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(d.socket()).unwrap())
        .collect();

    let client = Client::new(&d.socket());
    let install = {
        let socket = d.socket();
        let pkg = pkg.clone();
        std::thread::spawn(move || {
            Client::new(&socket).call(&Request::Install {
                manifest: pkg,
                start: false,
            })
        })
    };
    // Wait until the install is under way (its staging directory exists).
    let tmp = d.state_dir().join("images/tmp");
    let started = d.wait_for(Duration::from_secs(30), || {
        (std::fs::read_dir(&tmp).ok()?.count() > 0).then_some(())
    });
    assert!(started.is_some(), "the install did not start");
    let mut times = Vec::new();
    let mut during = 0;
    for _ in 0..100 {
        let t = Instant::now();
        let reply = client.call(&Request::List).expect("list answers");
        times.push(t.elapsed());
        assert!(reply["services"].is_array());
        if !install.is_finished() {
            during += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let worst = p99(times.clone());
    eprintln!(
        "list p99 {worst:?} over {} requests, {during} while the install ran",
        times.len()
    );
    assert!(
        during >= 50,
        "the install ended too soon to prove anything ({during})"
    );
    assert!(worst < Duration::from_millis(100), "list p99 {worst:?}");
    let res = install.join().unwrap();
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(d.status("t-big")["state"], "installed");
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("services/t-big/rootfs/d199"))
            .unwrap()
            .count(),
        1000
    );
    drop(idle);
}
