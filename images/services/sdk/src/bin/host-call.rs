//! `host-call OP [ARGS-JSON]`: makes one host call on the service's control channel
//! (`$GATEVISOR_VERDICT_SOCKET`, else a container's `/run/gatevisor/verdict.sock`) and prints the answer as one JSON line; for shells and
//! field engineers inside a service (`gatevisor service exec NAME -- host-call link.list`).
//! Exits 0 with the result, 1 when the call was refused or failed (the kind and reason on
//! stderr), 2 on bad usage or without a control channel.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (call, json) = match args.as_slice() {
        [call] => (call.as_str(), "{}"),
        [call, json] => (call.as_str(), json.as_str()),
        _ => {
            eprintln!("usage: host-call OP [ARGS-JSON]   e.g. host-call link.stats '{{\"link\":\"wlan0\"}}'");
            std::process::exit(2);
        }
    };
    let Ok(args) = serde_json::from_str::<serde_json::Value>(json) else {
        eprintln!("host-call: {json:?} is not JSON");
        std::process::exit(2);
    };
    // A shell opened with `gatevisor service exec` does not have the service's environment:
    // a container's control channel is always at this path.
    if std::env::var_os("GATEVISOR_VERDICT_SOCKET").is_none() {
        std::env::set_var("GATEVISOR_VERDICT_SOCKET", "/run/gatevisor/verdict.sock");
    }
    let Some(mut c) = gatevisor_service_sdk::VerdictClient::from_env() else {
        eprintln!("host-call: no control channel ($GATEVISOR_VERDICT_SOCKET)");
        std::process::exit(2);
    };
    match c.host_call(call, args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("host-call: {call}: {e}");
            std::process::exit(1);
        }
    }
}
