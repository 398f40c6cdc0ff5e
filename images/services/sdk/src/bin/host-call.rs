//! `host-call OP [ARGS-JSON]`: makes one host call on the service's control channel
//! (`$GATEVISOR_VERDICT_SOCKET`, else a container's `/run/gatevisor/verdict.sock`) and prints the answer as one JSON line; for shells and
//! field engineers inside a service (`gatevisor service exec NAME -- host-call link.list`).
//! `host-call --repeat N OP [ARGS-JSON]` times N calls and prints their p50 and p99.
//! Exits 0 with the result, 1 when the call was refused or failed (the kind and reason on
//! stderr), 2 on bad usage or without a control channel.

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--repeat N`: makes the call N times and prints the round trips' percentiles (µs)
    // instead of the answer (for benchmarks).
    let mut repeat = None;
    if args.first().is_some_and(|a| a == "--repeat") && args.len() >= 2 {
        repeat = args[1].parse::<usize>().ok().filter(|n| *n > 0);
        if repeat.is_none() {
            eprintln!("host-call: --repeat needs a count");
            std::process::exit(2);
        }
        args.drain(..2);
    }
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
    if let Some(n) = repeat {
        let mut us = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = std::time::Instant::now();
            if let Err(e) = c.host_call(call, args.clone()) {
                eprintln!("host-call: {call}: {e}");
                std::process::exit(1);
            }
            us.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        us.sort_by(f64::total_cmp);
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
        println!(
            "{}",
            serde_json::json!({"calls": n, "p50_us": at(0.5), "p99_us": at(0.99)})
        );
        return;
    }
    match c.host_call(call, args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("host-call: {call}: {e}");
            std::process::exit(1);
        }
    }
}
