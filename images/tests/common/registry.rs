//! A real registry for tests: Debian's `docker-registry` (the CNCF distribution server) on
//! loopback with TLS (a test CA made by openssl) and htpasswd basic auth, and `skopeo copy`
//! to push into it. Shared by the image store's tests and the daemon's (`#[path]`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
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
                 htpasswd -Bbn {USER} {PASSWORD} > htpasswd 2>/dev/null"
            ),
        );
        // A free port: the kernel's choice, released for the registry to take.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
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
  htpasswd:
    realm: gatevisor-test
    path: {d}/htpasswd
"
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
