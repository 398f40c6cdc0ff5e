//! The publisher's side: keys (`key gen|trust|revoke|list`), signed packages (`image
//! build`) and signatures of OCI images (`image sign`); the gateway's OCI images (`image
//! pull|list|rm`, through the daemon).

use super::*;

pub const DEFAULT_KEYS_DIR: &str = "/etc/gatevisor/keys";

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make a publisher key pair: OUT (secret, mode 0600) and OUT.pub.
    Gen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "publisher")]
        name: String,
    },
    /// Trust a publisher's public key on this gateway.
    Trust {
        public_key: PathBuf,
        #[arg(long, env = "GATEVISOR_KEYS_DIR", default_value = DEFAULT_KEYS_DIR)]
        keys_dir: PathBuf,
    },
    /// Revoke a trusted key (packages signed with it are refused from now on).
    Revoke {
        id: String,
        #[arg(long, env = "GATEVISOR_KEYS_DIR", default_value = DEFAULT_KEYS_DIR)]
        keys_dir: PathBuf,
    },
    List {
        #[arg(long, env = "GATEVISOR_KEYS_DIR", default_value = DEFAULT_KEYS_DIR)]
        keys_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build a signed package from a service folder: service.toml (with image = "package")
    /// and either rootfs/ (used as it is) or files/ (copied over a busybox rootfs).
    Build {
        dir: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Sign an OCI image for gateways that trust KEY: writes the detached signature of its
    /// digest (to OUT, else to standard output). REF: oci:DIR[:TAG], oci-archive:FILE[:TAG],
    /// docker-archive:FILE[:NAME:TAG], docker://HOST/REPO[:TAG|@sha256:HEX].
    Sign {
        reference: String,
        #[arg(long)]
        key: PathBuf,
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// A registry's CA (PEM), besides the system's.
        #[arg(long)]
        registry_ca: Option<PathBuf>,
        /// A registry user, with --password-file.
        #[arg(long, requires = "password_file")]
        username: Option<String>,
        /// The file whose first line is the registry password.
        #[arg(long, requires = "username")]
        password_file: Option<PathBuf>,
        /// The service manifest (service.toml) to sign with the image: a deployment document,
        /// what a gateway told only the image's reference (USP InstallDU) installs it with.
        #[arg(long)]
        service: Option<PathBuf>,
    },
    /// Import an OCI image into the gateway's image store, with its signature.
    Pull {
        reference: String,
        #[arg(long)]
        signature: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The OCI images in the store.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image no service runs (by digest, a 12-digit prefix, or a reference).
    Rm {
        image: String,
        #[arg(long)]
        json: bool,
    },
}

/// `oci:DIR[:TAG]` with its path made absolute (the daemon runs elsewhere).
pub fn absolute_reference(r: &str) -> String {
    match gatevisor_images::oci::source::Reference::parse(r) {
        Ok(parsed) if parsed.local_path().is_some_and(Path::is_relative) => {
            let local = parsed.local_path().expect("a local reference");
            let (transport, rest) = r.split_once(':').unwrap_or(("", r));
            let path = local.display().to_string();
            let abs = std::path::absolute(local)
                .map(|p| p.display().to_string())
                .unwrap_or(path.clone());
            format!("{transport}:{abs}{}", &rest[path.len()..])
        }
        _ => r.to_string(),
    }
}

pub fn key(cmd: KeyCmd) -> i32 {
    use gatevisor_images::keys::{SecretKey, TrustStore};
    let res: Result<(), String> = (|| match cmd {
        KeyCmd::Gen { out, name } => {
            let k = SecretKey::generate().map_err(|e| e.to_string())?;
            let public = k.save(&out, &name).map_err(|e| e.to_string())?;
            println!(
                "key {} written to {} (public key {})",
                gatevisor_images::keys::key_id(&k.public()),
                out.display(),
                public.display()
            );
            Ok(())
        }
        KeyCmd::Trust {
            public_key,
            keys_dir,
        } => {
            let id = TrustStore::new(&keys_dir)
                .trust(&public_key)
                .map_err(|e| e.to_string())?;
            println!("trusted key {id}");
            Ok(())
        }
        KeyCmd::Revoke { id, keys_dir } => {
            TrustStore::new(&keys_dir)
                .revoke(&id)
                .map_err(|e| e.to_string())?;
            println!("revoked key {id}");
            Ok(())
        }
        KeyCmd::List { keys_dir, json } => {
            let keys = TrustStore::new(&keys_dir).list();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys).unwrap_or_default()
                );
            } else {
                println!("{:<18} {:<10} NAME", "ID", "STATE");
                for k in keys {
                    println!(
                        "{:<18} {:<10} {}",
                        k.id,
                        if k.revoked { "revoked" } else { "trusted" },
                        k.name
                    );
                }
            }
            Ok(())
        }
    })();
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gatevisor: {e}");
            ErrorKind::Invalid.exit_code()
        }
    }
}

pub fn image(socket: &Path, cmd: ImageCmd) -> i32 {
    match cmd {
        ImageCmd::Build { dir, out, key } => match gatevisor::package::build(&dir, &out, &key) {
            Ok(m) => {
                println!("built {} {} -> {}", m.name, m.version, out.display());
                0
            }
            Err(e) => {
                eprintln!("gatevisor: {e}");
                ErrorKind::Invalid.exit_code()
            }
        },
        ImageCmd::Sign {
            reference,
            key,
            out,
            registry_ca,
            username,
            password_file,
            service,
        } => {
            use gatevisor_images::oci;
            let res = (|| -> Result<(oci::Digest, String), String> {
                let r = oci::source::Reference::parse(&reference).map_err(|e| e.to_string())?;
                // The manifest is checked as a gateway will parse it before it is signed.
                let service = service
                    .map(|p| {
                        let text = std::fs::read_to_string(&p)
                            .map_err(|e| format!("{}: {e}", p.display()))?;
                        gatevisor::manifest::Manifest::parse(&p, &text)
                            .map_err(|e| api::error_chain(&e))?;
                        Ok::<_, String>(text)
                    })
                    .transpose()?;
                let mut registries = oci::registry::Registries::default();
                if let oci::source::Reference::Registry(rr) = &r {
                    let access = oci::registry::RegistryAccess {
                        ca: registry_ca,
                        username,
                        password_file,
                        ..Default::default()
                    };
                    registries.hosts.insert(rr.registry.clone(), access);
                }
                let resolved =
                    oci::source::resolve(&r, &registries).map_err(|e| api::error_chain(&e))?;
                let k = gatevisor_images::keys::SecretKey::load(&key).map_err(|e| e.to_string())?;
                Ok((
                    resolved.digest.clone(),
                    oci::signature::sign_deployment(&k, &resolved.digest, service.as_deref()),
                ))
            })();
            match res {
                Ok((digest, doc)) => match out {
                    Some(out) => match std::fs::write(&out, doc) {
                        Ok(()) => {
                            println!("signed {digest} -> {}", out.display());
                            0
                        }
                        Err(e) => {
                            eprintln!("gatevisor: {}: {e}", out.display());
                            ErrorKind::Invalid.exit_code()
                        }
                    },
                    None => {
                        print!("{doc}");
                        0
                    }
                },
                Err(e) => {
                    eprintln!("gatevisor: {e}");
                    ErrorKind::Invalid.exit_code()
                }
            }
        }
        ImageCmd::Pull {
            reference,
            signature,
            json,
        } => {
            let req = Request::ImagePull {
                reference: absolute_reference(&reference),
                signature: std::path::absolute(&signature).unwrap_or(signature),
            };
            run(socket, req, json, |i: &api::ImageInfo| {
                println!(
                    "pulled {} signed by {} ({} layers stored, {} shared)",
                    i.digest,
                    i.publisher,
                    i.layers_added.unwrap_or(0),
                    i.layers_shared.unwrap_or(0)
                )
            })
        }
        ImageCmd::List { json } => run(socket, Request::ImageList, json, |l: &api::ImageList| {
            println!(
                "{:<14} {:<12} {:>6}  {:<16} REFERENCE",
                "DIGEST", "PUBLISHER", "LAYERS", "USED BY"
            );
            for i in &l.images {
                println!(
                    "{:<14} {:<12} {:>6}  {:<16} {}",
                    &i.digest.trim_start_matches("sha256:")[..12],
                    i.publisher,
                    i.layers.len(),
                    if i.used_by.is_empty() {
                        "-".to_string()
                    } else {
                        i.used_by.join(",")
                    },
                    i.references.last().map(String::as_str).unwrap_or("-")
                );
            }
        }),
        ImageCmd::Rm { image, json } => run(
            socket,
            Request::ImageRemove { image },
            json,
            |r: &api::ImageRemoved| {
                println!("removed {} ({} layers freed)", r.removed, r.layers_freed)
            },
        ),
    }
}
