//! The example services as signed packages, built on the host the way an operator would
//! (static binaries, `gatevisor image build`), for installing inside the gateway.

use crate::{host, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds each of `services` (folders of `images/services/`) into `dir/NAME.gvpkg`, signed by
/// a new key `dir/operator.key`; `tweak` may edit each package folder (`dir/NAME`) before
/// the build. Returns the packages and the public key to trust.
pub fn signed(
    dir: &Path,
    services: &[&str],
    tweak: impl Fn(&Path),
) -> Result<(Vec<PathBuf>, PathBuf)> {
    let root = crate::workspace();
    let static_dir = crate::build_static(services)?;
    let gatevisor = crate::image::gatevisor_binary()?;
    let key = dir.join("operator.key");
    let _ = std::fs::remove_file(&key);
    host(
        Command::new(&gatevisor)
            .args(["key", "gen", "--out"])
            .arg(&key)
            .args(["--name", "operator"]),
    )?;
    let mut pkgs = Vec::new();
    for s in services {
        let src = dir.join(s);
        let _ = std::fs::remove_dir_all(&src);
        host(
            Command::new("cp")
                .arg("-r")
                .arg(root.join(format!("images/services/{s}/package")))
                .arg(&src),
        )?;
        std::fs::create_dir_all(src.join("files/bin")).map_err(crate::io("mkdir files/bin"))?;
        std::fs::copy(static_dir.join(s), src.join(format!("files/bin/{s}")))
            .map_err(crate::io(format!("copy the {s} binary")))?;
        tweak(&src);
        let pkg = dir.join(format!("{s}.gvpkg"));
        host(
            Command::new(&gatevisor)
                .args(["image", "build"])
                .arg(&src)
                .arg("-o")
                .arg(&pkg)
                .arg("--key")
                .arg(&key),
        )?;
        pkgs.push(pkg);
    }
    Ok((pkgs, key.with_extension("pub")))
}
