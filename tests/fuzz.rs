//! Fuzz targets for the inputs an attacker controls: the package reader and rootfs unpacker,
//! the service manifest parser, the OpenFlow decoders, USP Record decoding and the control
//! channel's requests (host calls executed). Each mutates
//! seeds (valid inputs, from `tests/corpus/` and from the encoders) with byte overwrites,
//! insertions, deletions and truncation, and requires no panic and nothing written outside
//! the target directory. Failing cases are kept in `tests/corpus/fuzz-regressions.txt` and replayed first.
//!
//! Budget: `PROPTEST_CASES` cases per target (CI sets it in `scripts/test.sh`), default 256.

use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// Byte edits: (position, value, 0 overwrite / 1 insert / 2 delete).
type Edits = Vec<(u32, u8, u8)>;

fn mutate(seed: &[u8], edits: &Edits, cut: Option<u32>) -> Vec<u8> {
    let mut v = seed.to_vec();
    for &(pos, val, op) in edits {
        let at = pos as usize % (v.len() + 1);
        match (op, at < v.len()) {
            (0, true) => v[at] = val,
            (2, true) => {
                v.remove(at);
            }
            _ => v.insert(at, val),
        }
    }
    if let Some(c) = cut {
        v.truncate(c as usize % (v.len() + 1));
    }
    v
}

fn edits() -> impl Strategy<Value = (prop::sample::Index, Edits, Option<u32>)> {
    (
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 0..8),
        prop::option::weighted(0.2, any::<u32>()),
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        // Failing cases are kept here and replayed first by every later run.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/corpus/fuzz-regressions.txt"
            )),
        )),
        ..ProptestConfig::default()
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

// ------------------------------------------------------------------ packages

mod packages {
    use super::*;
    use gatevisor_images::keys::{SecretKey, TrustStore};
    use gatevisor_images::package::{self, ArtifactKind, Limits};

    /// A rootfs with a directory, files, a symlink and a hard link: every entry kind the
    /// unpacker accepts.
    pub fn rootfs_seed() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, ty: tar::EntryType, link: Option<&str>, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(ty);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, data).unwrap();
        };
        add("bin", tar::EntryType::Directory, None, b"");
        add("bin/busybox", tar::EntryType::Regular, None, b"ELF....");
        add("bin/sh", tar::EntryType::Symlink, Some("busybox"), b"");
        add("bin/ash", tar::EntryType::Link, Some("bin/busybox"), b"");
        add("etc/conf", tar::EntryType::Regular, None, b"x = 1\n");
        b.into_inner().unwrap()
    }

    pub struct Env {
        pub dir: tempfile::TempDir,
        pub trust: TrustStore,
        pub seeds: Vec<Vec<u8>>,
    }

    pub fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key.save(&dir.path().join("p.key"), "p").unwrap();
        let trust = TrustStore::new(&dir.path().join("keys"));
        trust.trust(&public).unwrap();
        let mut pkg = Vec::new();
        package::build(
            "demo",
            "1.0.0",
            &[
                ("service.toml", ArtifactKind::Service, b"name = \"demo\"\n"),
                ("rootfs.tar", ArtifactKind::Rootfs, &rootfs_seed()),
            ],
            &key,
            &mut pkg,
        )
        .unwrap();
        let mut seeds = corpus("package");
        seeds.push(pkg);
        Env { dir, trust, seeds }
    }

    /// Reads `bytes` as a package (unpacking its rootfs) into a fresh directory beside an
    /// `outside` one that must stay empty.
    pub fn read(env: &Env, bytes: &[u8]) {
        let case = tempfile::tempdir_in(env.dir.path()).unwrap();
        let (inside, outside) = (case.path().join("in"), case.path().join("outside"));
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let limits = Limits {
            max_total_bytes: 1 << 20,
            max_files: 64,
            max_path_len: 256,
        };
        let _ = package::verify_with(
            bytes,
            &env.trust,
            &limits,
            &inside,
            |a, r| {
                if a.kind == ArtifactKind::Rootfs {
                    gatevisor_images::rootfs::unpack(r, &inside.join("rootfs"), &limits)?;
                }
                Ok(())
            },
            |_| {},
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn package_reader_never_panics_or_writes_outside((i, e, cut) in edits()) {
        thread_local!(static ENV: packages::Env = packages::env());
        ENV.with(|env| {
            let bytes = mutate(i.get::<Vec<u8>>(&env.seeds), &e, cut);
            packages::read(env, &bytes);
        });
    }

    #[test]
    fn rootfs_unpack_never_panics_or_writes_outside((i, e, cut) in edits()) {
        let seeds = [packages::rootfs_seed()];
        let bytes = mutate(i.get::<Vec<u8>>(&seeds), &e, cut);
        let case = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(case.path().join("outside")).unwrap();
        let limits = gatevisor_images::package::Limits { max_total_bytes: 1 << 20, max_files: 64, max_path_len: 256 };
        let _ = gatevisor_images::rootfs::unpack(&bytes[..], &case.path().join("in"), &limits);
        prop_assert_eq!(std::fs::read_dir(case.path().join("outside")).unwrap().count(), 0);
        let top: Vec<_> = std::fs::read_dir(case.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        prop_assert!(top.len() <= 2, "{:?}", top);
    }

    #[test]
    fn manifest_parser_never_panics((i, e, cut) in edits()) {
        let seeds = corpus("manifest");
        let bytes = mutate(i.get::<Vec<u8>>(&seeds), &e, cut);
        let text = String::from_utf8_lossy(&bytes);
        let file = Path::new("/nonexistent/fuzz.toml");
        if let Ok(m) = gatevisor::manifest::Manifest::parse(file, &text) {
            let _ = m.validate(file);
            let _ = m.capability_set(file);
        }
    }

    #[test]
    fn openflow_decoders_never_panic((i, e, cut) in edits()) {
        let seeds = openflow_seeds();
        let bytes = mutate(i.get::<Vec<u8>>(&seeds), &e, cut);
        use flowbridge::ofp;
        let _ = ofp::decode_flow_stats(&bytes);
        let _ = ofp::decode_port_stats(&bytes);
        let _ = ofp::Action::decode_list(&bytes);
        let _ = ofp::Instruction::decode_list(&bytes);
        let _ = ofp::decode_match(&mut ofp::Rd::new(&bytes));
    }

    #[test]
    fn control_channel_requests_and_host_calls_never_panic((i, e, cut) in edits()) {
        let seeds: Vec<Vec<u8>> = [
            r#"{"op":"call","call":"link.stats","args":{"link":"lo"}}"#,
            r#"{"op":"call","call":"link.list","args":{}}"#,
            r#"{"op":"call","call":"neigh.list","args":{"link":"lo"}}"#,
            r#"{"op":"call","call":"board.fact","args":{"fact":"uptime"}}"#,
            r#"{"op":"call","call":"dhcp.leases","args":{}}"#,
            r#"{"op":"verdict","verdict":"allow","session":{"proto":"tcp","src":"10.0.0.2:1","dst":"10.0.0.1:80"}}"#,
            r#"{"op":"hello"}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        let bytes = mutate(i.get::<Vec<u8>>(&seeds), &e, cut);
        // Every operation granted on everything: what a decoded call does is all that is tested.
        let all: Vec<String> = gatevisor::hostcall::OPERATIONS.iter().map(|o| o.to_string()).collect();
        let grants = gatevisor::hostcall::Grants::parse(&all).unwrap();
        if let Ok(gatevisor::verdict::Request::Call(call)) =
            serde_json::from_slice::<gatevisor::verdict::Request>(&bytes)
        {
            let _ = gatevisor::hostcall::execute(&call, &grants, &Default::default());
        }
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = gatevisor::hostcall::Grant::parse(text);
        }
    }

    #[test]
    fn usp_record_decoding_never_panics((i, e, cut) in edits()) {
        let seeds = usp_seeds();
        let bytes = mutate(i.get::<Vec<u8>>(&seeds), &e, cut);
        use gatevisor::usp::codec::Codec;
        let _ = gatevisor::usp::codec::Rusp.decode(&bytes);
    }
}

/// A flow-stats entry, port stats, a match, actions and instructions, as the switch sends them.
fn openflow_seeds() -> Vec<Vec<u8>> {
    use flowbridge::ofp::{self, Action, Field, Instruction};
    let matches = vec![
        Field::InPort(3),
        Field::EthType(0x0800),
        Field::Ipv4Src(0x0a000001, Some(0xffffff00)),
        Field::CtState(0x21, 0x21),
        Field::CtLabel(1, None),
    ];
    let instructions = vec![
        Instruction::Apply(vec![
            Action::Output(2),
            Action::SetField(Field::CtMark(1, None)),
        ]),
        Instruction::GotoTable(20),
    ];
    let mut m = Vec::new();
    ofp::encode_match(&matches, &mut m);
    let mut ins = Vec::new();
    for i in &instructions {
        i.encode(&mut ins);
    }
    let mut acts = Vec::new();
    Action::Output(7).encode(&mut acts);
    // ofp_flow_stats: length, table, pad, durations, priority, timeouts, flags, pad, cookie,
    // packet and byte counts; then the match and the instructions.
    let mut stats = Vec::new();
    let len = (48 + m.len() + ins.len()) as u16;
    stats.extend_from_slice(&len.to_be_bytes());
    stats.extend_from_slice(&[10, 0]);
    stats.extend_from_slice(&[0u8; 8]);
    stats.extend_from_slice(&100u16.to_be_bytes());
    stats.extend_from_slice(&[0u8; 10]);
    stats.extend_from_slice(&0x5u64.to_be_bytes());
    stats.extend_from_slice(&[0u8; 16]);
    stats.extend_from_slice(&m);
    stats.extend_from_slice(&ins);
    let mut port = vec![0u8; 112];
    port[3] = 1;
    vec![stats, port, m, ins, acts]
}

/// Requests a Controller sends, as Records.
fn usp_seeds() -> Vec<Vec<u8>> {
    use rusp_lib::usp_builder as b;
    let bodies = vec![
        b::GetBuilder::new()
            .with_params(vec!["Device.SoftwareModules.DeploymentUnit.*.Name".into()])
            .build()
            .unwrap(),
        b::OperateBuilder::new("Device.SoftwareModules.InstallDU()".into())
            .with_command_key("k".into())
            .with_send_resp(true)
            .with_input_args(vec![("URL".into(), "file:///x.gvpkg".into())])
            .build()
            .unwrap(),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(n, body)| {
            let msg = b::MsgBuilder::new()
                .with_msg_id(format!("m{n}"))
                .with_body(body)
                .build()
                .unwrap();
            b::RecordBuilder::new()
                .with_version("1.3".into())
                .with_to_id("os::agent".into())
                .with_from_id("self::controller".into())
                .with_no_session_context_payload(&msg)
                .build()
                .unwrap()
                .to_vec()
                .unwrap()
        })
        .collect()
}
