//! The OCI documents gatevisor reads (image-spec v1.1): index, manifest, config, and the
//! Docker v2 forms that `docker save` and registries still use. Unknown fields are ignored,
//! as the spec asks.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The annotation of an index entry that names its tag in an image layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Manifests, indexes and configs are small: anything larger is refused before it is read.
pub const MAX_DOCUMENT: u64 = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Where a non-distributable layer is fetched from: never followed.
    #[serde(default)]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_LIST
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    pub fn text(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image's configuration: what it runs, and its layers' uncompressed digests.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// The part of a config that says how the image runs (fields may be absent or null).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub stop_signal: Option<String>,
}

impl ImageConfig {
    pub fn run(&self) -> RunConfig {
        self.config.clone().unwrap_or_default()
    }

    /// What the image runs: its entrypoint followed by its command.
    pub fn argv(&self) -> Vec<String> {
        let r = self.run();
        r.entrypoint
            .unwrap_or_default()
            .into_iter()
            .chain(r.cmd.unwrap_or_default())
            .collect()
    }

    /// Its environment as (name, value), in its order; entries without `=` are skipped.
    pub fn env(&self) -> Vec<(String, String)> {
        self.run()
            .env
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.run().labels.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_null_and_missing_fields_reads() {
        let c: ImageConfig = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["/bin/sh"],
                "Entrypoint":null,"Labels":{"a":"b"},"Unknown":1},
                "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.argv(), ["/bin/sh"]);
        assert!(c.env().is_empty());
        assert_eq!(c.labels()["a"], "b");
        let bare: ImageConfig =
            serde_json::from_str(r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        assert!(bare.argv().is_empty());
    }
}
