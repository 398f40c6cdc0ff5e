//! The settings watch against a real Unix socket standing in for the supervisor: a service
//! that starts before its control channel answers still gets the operator's settings once it
//! does, and every change after.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn settings_reach_a_service_that_started_before_its_supervisor_answered() {
    let dir = std::env::temp_dir().join(format!("gv-sdk-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("verdict.sock");
    // The only test in this binary that sets the variable; it is read by the SDK's threads.
    std::env::set_var("GATEVISOR_VERDICT_SOCKET", &path);

    let (tx, rx) = mpsc::channel();
    let first = gatevisor_service_sdk::watch_settings(move |v| {
        let _ = tx.send(v.clone());
    });
    assert_eq!(first, None, "nothing answers yet");

    // The supervisor comes up: the watch is answered with the settings as they are.
    let listener = UnixListener::bind(&path).unwrap();
    let mut w = answer_watch(&listener, r#"{"KidsBlock":["a.test"]}"#);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the settings");
    assert_eq!(got["KidsBlock"][0], "a.test");

    // A change is passed on; the same value again is not.
    w.write_all(
        b"{\"event\":\"settings\",\"generation\":2,\"settings\":{\"KidsBlock\":[\"b.test\"]}}\n",
    )
    .unwrap();
    w.write_all(
        b"{\"event\":\"settings\",\"generation\":3,\"settings\":{\"KidsBlock\":[\"b.test\"]}}\n",
    )
    .unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the change");
    assert_eq!(got["KidsBlock"][0], "b.test");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());

    // The supervisor restarts: the watch comes back and says what changed meanwhile.
    drop(w);
    let _w = answer_watch(&listener, r#"{"KidsBlock":["c.test"]}"#);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("after the restart");
    assert_eq!(got["KidsBlock"][0], "c.test");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Takes the SDK's next connection, checks it asks to watch, and answers with `settings`;
/// the connection, to send changes on.
fn answer_watch(l: &UnixListener, settings: &str) -> UnixStream {
    let conn = accept_within(l, Duration::from_secs(10));
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), r#"{"op":"watch"}"#);
    let mut w = conn;
    writeln!(w, r#"{{"ok":true,"generation":1,"settings":{settings}}}"#).unwrap();
    w
}

/// The next connection, or a failure after `limit` (an SDK that never comes back).
fn accept_within(l: &UnixListener, limit: Duration) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let end = std::time::Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).unwrap();
                return c;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < end, "the SDK never connected");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
