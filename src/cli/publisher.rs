//! The publisher's side: keys (`key gen|trust|revoke|list`) and signed packages (`image
//! build`).

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

pub fn image(cmd: ImageCmd) -> i32 {
    let ImageCmd::Build { dir, out, key } = cmd;
    match gatevisor::package::build(&dir, &out, &key) {
        Ok(m) => {
            println!("built {} {} -> {}", m.name, m.version, out.display());
            0
        }
        Err(e) => {
            eprintln!("gatevisor: {e}");
            ErrorKind::Invalid.exit_code()
        }
    }
}
