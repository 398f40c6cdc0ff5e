//! Images from a registry, over the OCI distribution API (HTTPS only).
//!
//! `docker://HOST[:PORT]/REPO[:TAG]` or `docker://HOST[:PORT]/REPO@sha256:HEX` (skopeo's
//! spelling); a first component without '.' or ':' (and not `localhost`) is a Docker Hub
//! name, as docker reads it. The manifest is asked for in the four forms (OCI and Docker
//! index and manifest) and checked against the digest the reference names, if it names
//! one; an index is followed to its `linux/amd64` entry by digest.
//!
//! Access: each registry (by `HOST[:PORT]`) may have its own CA file and credentials in the
//! daemon's configuration ([`Registries`]). A registry that answers 401 is asked again with
//! what its challenge asks for: `Basic` credentials, or a `Bearer` token fetched from its
//! realm (with the credentials, when there are any; anonymously otherwise). Credentials go
//! only to the registry itself and its token realm: a redirect to another host (a blob
//! store) is followed without them, and never from https to plain http.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Digest, OciError};
use crate::http::{self, Response, Url};

/// A request (its answer's body included) may take this long; a stalled one fails after
/// [`http::IDLE`].
const REQUEST_DEADLINE: Duration = Duration::from_secs(3600);
/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// The largest token answer and error answer read.
const MAX_SMALL: u64 = 64 << 10;

/// The manifest forms asked for.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// An image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `HOST[:PORT]` as written (`docker.io` for Docker Hub names).
    pub registry: String,
    pub repository: String,
    /// The tag asked for (`latest` when the reference names neither tag nor digest).
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn valid_component(c: &str) -> bool {
    // The distribution spec's path component: [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*.
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        && !c.contains("..")
}

fn valid_tag(t: &str) -> bool {
    // [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    (1..=128).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !t.starts_with(['.', '-'])
}

impl RegistryRef {
    /// Parses what follows `docker://`.
    pub fn parse(s: &str) -> Result<RegistryRef, OciError> {
        let bad = || OciError::BadReference(format!("docker://{s}"));
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        let (first, rest) = name.split_once('/').unwrap_or(("", name));
        let (registry, repository) = if first.contains(['.', ':']) || first == "localhost" {
            (first.to_string(), rest.to_string())
        } else if name.contains('/') {
            ("docker.io".to_string(), name.to_string())
        } else {
            ("docker.io".to_string(), format!("library/{name}"))
        };
        let host_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !host_ok
            || !repository.split('/').all(valid_component)
            || tag.as_deref().is_some_and(|t| !valid_tag(t))
        {
            return Err(bad());
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to connect to (Docker Hub's API lives elsewhere than its name).
    fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What the manifest is asked for by: the digest if the reference names one, else the tag.
    fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }
}

impl std::fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "docker://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// How gatevisor reaches one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAccess {
    /// The CAs its certificate is checked against (PEM), besides the default bundle.
    pub ca: Option<PathBuf>,
    /// Credentials: a user name, and a file that holds the password (or token) on its first
    /// line.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Where the operator's deployment documents of this registry's images are (`https://`
    /// or `http://`; they are signed): the document of `REPO@sha256:HEX` is
    /// `SIGNATURES/REPO@sha256=HEX/signature-1`, the lookaside layout container tools use.
    pub signatures: Option<String>,
}

/// Every registry's access, by `HOST[:PORT]`, and the CA bundle every one trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registries {
    pub default_ca: PathBuf,
    pub hosts: BTreeMap<String, RegistryAccess>,
}

impl Default for Registries {
    fn default() -> Registries {
        Registries {
            default_ca: http::SYSTEM_CA_BUNDLE.into(),
            hosts: BTreeMap::new(),
        }
    }
}

impl Registries {
    /// Checks that every CA and password file named can be read, so that a mistake is seen
    /// when the daemon starts, not at the first pull.
    pub fn check(&self) -> Result<(), String> {
        for (host, a) in &self.hosts {
            if a.username.is_some() != a.password_file.is_some() {
                return Err(format!(
                    "registry {host}: username and password_file go together"
                ));
            }
            if let Some(ca) = &a.ca {
                http::ca_roots(ca, false).map_err(|e| format!("registry {host}: {e}"))?;
            }
            if let Some(p) = &a.password_file {
                read_password(p).map_err(|e| format!("registry {host}: {e}"))?;
            }
            if let Some(u) = &a.signatures {
                Url::parse(u).map_err(|e| format!("registry {host}: signatures: {e}"))?;
            }
        }
        Ok(())
    }

    /// Where the deployment document of image `digest` of `r`'s repository is.
    pub fn signature_url(&self, r: &RegistryRef, digest: &Digest) -> Result<String, OciError> {
        let base = self
            .hosts
            .get(&r.registry)
            .and_then(|a| a.signatures.as_deref())
            .ok_or_else(|| OciError::Registry {
                registry: r.registry.clone(),
                status: None,
                why: format!(
                    "no place for its images' signatures is configured ([registries.\"{}\"] signatures)",
                    r.registry
                ),
            })?;
        Ok(format!(
            "{}/{}@sha256={}/signature-1",
            base.trim_end_matches('/'),
            r.repository,
            digest.hex()
        ))
    }

    fn session(&self, r: &RegistryRef) -> Result<Session, OciError> {
        let access = self.hosts.get(&r.registry).cloned().unwrap_or_default();
        let fail = |why: String| OciError::Registry {
            registry: r.registry.clone(),
            status: None,
            why,
        };
        let mut roots = http::ca_roots(&self.default_ca, true).unwrap_or_else(|_| {
            // Without a system bundle, the registry's own CA must do.
            rustls::RootCertStore::empty()
        });
        if let Some(ca) = &access.ca {
            for c in http::ca_roots(ca, false)
                .map_err(|e| fail(e.to_string()))?
                .roots
            {
                roots.roots.push(c);
            }
        }
        if roots.is_empty() {
            return Err(fail(format!(
                "no CA to check it against ({} cannot be read and none is configured for it)",
                self.default_ca.display()
            )));
        }
        let tls = http::client_builder()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let credentials = match (&access.username, &access.password_file) {
            (Some(u), Some(p)) => Some((
                u.clone(),
                read_password(p).map_err(|e| fail(e.to_string()))?,
            )),
            _ => None,
        };
        let base =
            Url::parse(&format!("https://{}/", r.api_host())).map_err(|e| fail(e.to_string()))?;
        Ok(Session {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            base,
            tls: Arc::new(tls),
            credentials,
            auth: Mutex::new(None),
        })
    }
}

fn read_password(p: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: empty", p.display()),
        ));
    }
    Ok(line)
}

/// One pull's way to its registry: the TLS trust, the credentials, the authorization won.
pub(super) struct Session {
    registry: String,
    repository: String,
    base: Url,
    tls: Arc<rustls::ClientConfig>,
    credentials: Option<(String, String)>,
    /// The `Authorization` header value the registry accepted (or asked for) last.
    auth: Mutex<Option<String>>,
}

/// `key="value", key=value` pairs of an authentication challenge.
fn challenge_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let key = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (value, after) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(end) => (&v[..end], &v[end..]),
                None => (v, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// `s` percent-encoded for a query string.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.https == b.https && a.host == b.host && a.port == b.port
}

impl Session {
    fn error(&self, status: Option<u16>, why: impl Into<String>) -> OciError {
        OciError::Registry {
            registry: self.registry.clone(),
            status,
            why: why.into(),
        }
    }

    fn denied(&self, why: impl Into<String>) -> OciError {
        OciError::AccessDenied {
            registry: self.registry.clone(),
            why: why.into(),
        }
    }

    /// GETs `path` of the registry, authorizing as its challenge asks and following
    /// redirects; any answer but 200 is an error that says what the registry said.
    pub(super) fn get(&self, path: &str, accept: Option<&str>) -> Result<Response, OciError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut url = self
            .base
            .join(path)
            .map_err(|e| self.error(None, e.to_string()))?;
        let mut authorized = false;
        let mut redirects = 0;
        loop {
            let auth = same_origin(&url, &self.base)
                .then(|| self.auth.lock().expect("not poisoned").clone())
                .flatten();
            let mut headers = Vec::new();
            if let Some(a) = accept {
                headers.push(("Accept", a));
            }
            if let Some(a) = &auth {
                headers.push(("Authorization", a.as_str()));
            }
            let resp = http::get(&url, &headers, Some(&self.tls), deadline)
                .map_err(|e| self.error(None, format!("{}: {e}", url.host)))?;
            match resp.status {
                200 => return Ok(resp),
                301 | 302 | 303 | 307 | 308 => {
                    redirects += 1;
                    let next = resp
                        .header("location")
                        .ok_or_else(|| self.error(Some(resp.status), "a redirect without Location"))
                        .and_then(|l| url.join(l).map_err(|e| self.error(None, e.to_string())))?;
                    if redirects > MAX_REDIRECTS {
                        return Err(
                            self.error(None, format!("more than {MAX_REDIRECTS} redirects"))
                        );
                    }
                    if url.https && !next.https {
                        return Err(
                            self.error(None, format!("a redirect to plain {next} is not followed"))
                        );
                    }
                    url = next;
                }
                401 if !authorized && same_origin(&url, &self.base) => {
                    authorized = true;
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
                    let a = self.authorize(&challenge)?;
                    *self.auth.lock().expect("not poisoned") = Some(a);
                }
                401 | 403 => {
                    let said = registry_message(resp);
                    return Err(self.denied(match &self.credentials {
                        Some((u, _)) => format!("it refused the credentials of {u:?}{said}"),
                        None => {
                            format!("it wants credentials and none are configured for it{said}")
                        }
                    }));
                }
                status => {
                    let what = format!("{path}: HTTP {status} {}", resp.reason.trim());
                    let said = registry_message(resp);
                    return Err(self.error(Some(status), format!("{what}{said}")));
                }
            }
        }
    }

    /// The `Authorization` value that answers `challenge` (a 401's WWW-Authenticate).
    fn authorize(&self, challenge: &str) -> Result<String, OciError> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = challenge_params(params);
        if scheme.eq_ignore_ascii_case("basic") {
            return match &self.credentials {
                Some((u, p)) => Ok(http::basic_auth(u, p)),
                None => Err(self.denied("it wants credentials and none are configured for it")),
            };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.denied(format!(
                "it asks for {scheme:?} authentication, which gatevisor does not speak"
            )));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| self.denied("its Bearer challenge names no realm"))?;
        let mut realm =
            Url::parse(realm).map_err(|e| self.denied(format!("its token realm: {e}")))?;
        if !realm.https {
            return Err(self.denied(format!("its token realm {realm} is not https")));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut query = format!("scope={}", query_escape(&scope));
        if let Some(s) = params.get("service") {
            query = format!("service={}&{query}", query_escape(s));
        }
        realm.path = format!(
            "{}{}{query}",
            realm.path,
            if realm.path.contains('?') { '&' } else { '?' }
        );
        let basic = self
            .credentials
            .as_ref()
            .map(|(u, p)| http::basic_auth(u, p));
        let mut headers = Vec::new();
        if let Some(b) = &basic {
            headers.push(("Authorization", b.as_str()));
        }
        let resp = http::get(
            &realm,
            &headers,
            Some(&self.tls),
            Instant::now() + REQUEST_DEADLINE,
        )
        .map_err(|e| self.error(None, format!("token realm {}: {e}", realm.host)))?;
        match resp.status {
            200 => {}
            401 | 403 => {
                let said = registry_message(resp);
                return Err(self.denied(match &self.credentials {
                    Some((u, _)) => {
                        format!("its token service refused the credentials of {u:?}{said}")
                    }
                    None => {
                        format!("its token service wants credentials and none are configured{said}")
                    }
                }));
            }
            s => {
                return Err(self.error(
                    Some(s),
                    format!("token realm answered HTTP {s} {}", resp.reason),
                ))
            }
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp
            .read_limited(MAX_SMALL)
            .map_err(|e| self.error(None, format!("token realm: {e}")))?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| self.error(None, format!("token realm's answer: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty() && !t.contains(['\r', '\n']))
            .ok_or_else(|| self.error(None, "the token realm gave no token"))?;
        Ok(format!("Bearer {token}"))
    }
}

/// What a registry's error answer says (`errors[0].message`), as ": MESSAGE".
fn registry_message(resp: Response) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        message: String,
        #[serde(default)]
        code: String,
    }
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<E>,
    }
    let Ok(body) = resp.read_limited(MAX_SMALL) else {
        return String::new();
    };
    match serde_json::from_slice::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => {
            let e = &e.errors[0];
            format!(": {} ({})", e.message, e.code)
        }
        _ => String::new(),
    }
}

/// The registry as the resolver's files: `blobs/sha256/HEX` is a blob, `manifests/REF` a
/// manifest.
pub(super) struct RegistryFiles {
    pub(super) session: Session,
    pub(super) r: RegistryRef,
}

impl RegistryFiles {
    pub(super) fn open(
        r: &RegistryRef,
        registries: &Registries,
    ) -> Result<RegistryFiles, OciError> {
        Ok(RegistryFiles {
            session: registries.session(r)?,
            r: r.clone(),
        })
    }

    /// The manifest the reference names: its bytes (at most `limit`) and content type.
    pub(super) fn top_manifest(&self, limit: u64) -> Result<(Vec<u8>, String), OciError> {
        let target = self.r.target();
        let resp = self
            .session
            .get(&self.manifest_url(&target), Some(ACCEPT))?;
        let ct = resp.header("content-type").unwrap_or("").to_string();
        let body = resp
            .read_limited(limit)
            .map_err(|e| self.session.error(None, format!("manifest {target}: {e}")))?;
        Ok((body, ct))
    }

    fn manifest_url(&self, target: &str) -> String {
        format!("/v2/{}/manifests/{target}", self.r.repository)
    }

    pub(super) fn open_path(&self, path: &str) -> Result<Box<dyn Read + Send + '_>, OciError> {
        let url = if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            format!("/v2/{}/blobs/sha256:{hex}", self.r.repository)
        } else if let Some(m) = path.strip_prefix("manifests/") {
            return Ok(Box::new(
                self.session.get(&self.manifest_url(m), Some(ACCEPT))?,
            ));
        } else {
            return Err(self
                .session
                .error(None, format!("{path}: not in a registry")));
        };
        Ok(Box::new(self.session.get(&url, None)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_docker_reads_them() {
        let p = |s: &str| RegistryRef::parse(s).unwrap();
        let r = p("127.0.0.1:5000/gv/broker:1.0");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "gv/broker", Some("1.0"))
        );
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/gv/broker:1.0");
        let r = p("busybox");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let hex = "a".repeat(64);
        let r = p(&format!("localhost/x@sha256:{hex}"));
        assert_eq!((r.tag, r.digest.unwrap().hex()), (None, hex.as_str()));
        assert_eq!(p("reg.example/a/b").tag.as_deref(), Some("latest"));
        for bad in [
            "",
            "reg.example/",
            "reg.example/A",
            "reg.example/a/../b",
            "reg.example/a:-x",
            "reg.example/a@sha256:xyz",
            "re g/a",
            "reg.example/a//b",
            "reg.example/a:b:c",
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_are_read_with_quoted_commas() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let p = challenge_params(r#"realm=basic-realm, x="y""#);
        assert_eq!((p["realm"].as_str(), p["x"].as_str()), ("basic-realm", "y"));
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
