//! A real registry for tests: Debian's `docker-registry` (the CNCF distribution server) on
//! loopback with TLS (a test CA made by openssl) and either htpasswd basic auth or token
//! auth (a token server of this file: HTTPS, ES256 JWTs whose x5c certificate the registry
//! trusts, given for the test user's password only), and `skopeo copy` to push into it.
//! Shared by the image store's tests and the daemon's (`#[path]`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatevisor_images::oci::registry::{Registries, RegistryAccess};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(dir: &Path, script: &str) {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
}

/// The tools a registry test needs besides umoci and skopeo; the first one missing.
pub fn missing_tool() -> Option<&'static str> {
    [
        ("docker-registry", "--version"),
        ("htpasswd", "-h"),
        ("openssl", "version"),
        ("skopeo", "--version"),
    ]
    .into_iter()
    .find(|(t, arg)| Command::new(t).arg(arg).output().is_err())
    .map(|(t, _)| t)
}

pub const USER: &str = "gv-operator";
pub const PASSWORD: &str = "s3cret-pass";

/// A `docker-registry` this test started (ended by its PID when dropped).
pub struct Registry {
    child: Child,
    pub host: String,
    /// Its files: `certs/ca.crt` (the CA skopeo and gatevisor trust), `storage/`.
    pub dir: PathBuf,
    /// Its token server, under token auth.
    pub tokens: Option<TokenServer>,
}

/// How a test registry authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// htpasswd: `Authorization: Basic` on every request.
    Basic,
    /// Bearer tokens from [`TokenServer`].
    Token,
}

const SERVICE: &str = "gatevisor-test-registry";
const ISSUER: &str = "gatevisor-test-issuer";

/// The token server of a registry under token auth (a thread of this test), over HTTPS with
/// the registry's certificate. A request with the test user's password gets a token for
/// the scope it asks; any other gets 401.
pub struct TokenServer {
    pub port: u16,
    /// Tokens given, and requests refused.
    pub issued: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn b64url(bytes: &[u8]) -> String {
    gatevisor_images::http::base64(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    fn start(dir: &Path) -> TokenServer {
        let pem = |p: &str| std::fs::read(dir.join(p)).unwrap();
        let chain = rustls_pemfile::certs(&mut &pem("reg.crt")[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut &pem("reg.key")[..])
            .unwrap()
            .unwrap();
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        );
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pem("token.pk8"),
            &rng,
        )
        .unwrap();
        let x5c = gatevisor_images::http::base64(&pem("token.der"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (issued, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, i, r) = (stop.clone(), issued.clone(), refused.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(session) = rustls::ServerConnection::new(tls.clone()) else {
                    continue;
                };
                let mut stream = rustls::StreamOwned::new(session, tcp);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let authorized = head.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("authorization:")
                        && l[14..].trim() == gatevisor_images::http::basic_auth(USER, PASSWORD)
                });
                let reply = if authorized {
                    i.fetch_add(1, Ordering::SeqCst);
                    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
                    let access: Vec<serde_json::Value> = query
                        .split('&')
                        .filter_map(|kv| kv.strip_prefix("scope="))
                        .map(percent_decode)
                        .filter_map(|scope| {
                            let mut p = scope.splitn(3, ':');
                            let (kind, name, actions) = (p.next()?, p.next()?, p.next()?);
                            Some(serde_json::json!({
                                "type": kind, "name": name,
                                "actions": actions.split(',').collect::<Vec<_>>(),
                            }))
                        })
                        .collect();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
                    let claims = serde_json::json!({
                        "iss": ISSUER, "sub": USER, "aud": SERVICE,
                        "exp": now + 300, "nbf": now - 10, "iat": now,
                        "jti": format!("t{}", i.load(Ordering::SeqCst)), "access": access,
                    });
                    let signing = format!(
                        "{}.{}",
                        b64url(header.to_string().as_bytes()),
                        b64url(claims.to_string().as_bytes())
                    );
                    let sig = signer.sign(&rng, signing.as_bytes()).unwrap();
                    let body =
                        serde_json::json!({"token": format!("{signing}.{}", b64url(sig.as_ref()))})
                            .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    r.fetch_add(1, Ordering::SeqCst);
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(reply.as_bytes());
                let _ = stream.flush();
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
        });
        TokenServer {
            port,
            issued,
            refused,
            stop,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, Auth::Basic)
    }

    pub fn start_with(dir: &Path, auth: Auth) -> Registry {
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        sh(
            dir,
            &format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
                   -keyout ca.key -out certs/ca.crt -subj /CN=gatevisor-test-ca \
                   -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
                 openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                   -keyout reg.key -out reg.csr -subj /CN=127.0.0.1 2>/dev/null
                 printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
                 openssl x509 -req -in reg.csr -CA certs/ca.crt -CAkey ca.key -CAcreateserial \
                   -days 2 -extfile ext -out reg.crt 2>/dev/null
                 htpasswd -Bbn {USER} {PASSWORD} > htpasswd 2>/dev/null
                 openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out token.pem 2>/dev/null
                 openssl pkcs8 -topk8 -nocrypt -in token.pem -outform DER -out token.pk8
                 openssl req -x509 -key token.pem -days 2 -subj /CN=gatevisor-test-token -out token.crt 2>/dev/null
                 openssl x509 -in token.crt -outform DER -out token.der"
            ),
        );
        let d = dir.display();
        let (auth_config, tokens) = match auth {
            Auth::Basic => (
                format!("  htpasswd:\n    realm: gatevisor-test\n    path: {d}/htpasswd\n"),
                None,
            ),
            Auth::Token => {
                let t = TokenServer::start(dir);
                (
                    format!(
                        "  token:\n    realm: https://127.0.0.1:{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {d}/token.crt\n",
                        t.port
                    ),
                    Some(t),
                )
            }
        };
        // A free port: the kernel's choice, released for the registry to take.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {d}/storage
http:
  addr: 127.0.0.1:{port}
  tls:
    certificate: {d}/reg.crt
    key: {d}/reg.key
auth:
{auth_config}"
            ),
        )
        .unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "docker-registry ended ({st}): {}",
                    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < until, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            host: format!("127.0.0.1:{port}"),
            dir: dir.into(),
            tokens,
        }
    }

    /// `skopeo copy` of `from` into this registry as `repo:tag`.
    pub fn push(&self, from: &str, repo_tag: &str) {
        run(Command::new("skopeo").args([
            "copy",
            "-q",
            "--dest-cert-dir",
            &self.dir.join("certs").display().to_string(),
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            from,
            &format!("docker://{}/{repo_tag}", self.host),
        ]));
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.host)
    }

    /// How a gateway reaches this registry: its CA, and `password` for the operator's user.
    pub fn access(&self, password: Option<&str>) -> Registries {
        let mut access = RegistryAccess {
            ca: Some(self.dir.join("certs/ca.crt")),
            ..Default::default()
        };
        if let Some(p) = password {
            let file = self.dir.join(format!("password-{}", p.len()));
            std::fs::write(&file, format!("{p}\n")).unwrap();
            access.username = Some(USER.into());
            access.password_file = Some(file);
        }
        let mut r = Registries::default();
        r.hosts.insert(self.host.clone(), access);
        r
    }
}
