//! NeMo Automodel's checkpoint folder: `model/` holds the shards and a
//! `.hf_metadata/` folder with the file mapping, the dtype map and the
//! original model's non-weight files. Found in INPUT_DIR, it stands in for
//! the options a user would otherwise pass by hand, as NeMo's offline
//! consolidation tool reads it: `fqn_to_file_index_mapping.json` is the
//! mapping, `fqn_to_dtype_mapping.json` the dtype map, and every other
//! entry is copied into OUTPUT_DIR like `--hf-assets`. An option given on
//! the command line wins over the file that stands in for it.

use crate::plan::dtypes::DtypeMapSource;
use crate::plan::mapping::MappingSource;
use crate::run::Config;
use std::path::Path;

/// The folder's name inside INPUT_DIR.
pub const FOLDER: &str = ".hf_metadata";
/// NeMo's file mapping in it.
pub const MAPPING: &str = "fqn_to_file_index_mapping.json";
/// NeMo's dtype map in it.
pub const DTYPE_MAP: &str = "fqn_to_dtype_mapping.json";

/// What was taken from `.hf_metadata`, for the summary and the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Taken {
    /// The folder.
    pub folder: String,
    /// Its mapping, if used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<String>,
    /// Its dtype map, if used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype_map: Option<String>,
    /// Whether its other entries are copied as assets.
    pub assets: bool,
}

impl Taken {
    /// What was taken, one item each, for the report.
    pub fn listed(&self) -> Vec<String> {
        let mut items = vec![];
        if let Some(mapping) = &self.mapping {
            items.push(format!("mapping: {}/{mapping}", self.folder));
        }
        if let Some(map) = &self.dtype_map {
            items.push(format!("dtype map: {}/{map}", self.folder));
        }
        if self.assets {
            items.push(format!("assets: {}", self.folder));
        }
        items
    }

    /// One line for people.
    pub fn human(&self) -> String {
        let mut used = vec![];
        if let Some(mapping) = &self.mapping {
            used.push(format!("{mapping} as the mapping"));
        }
        if let Some(map) = &self.dtype_map {
            used.push(format!("{map} as the dtype map"));
        }
        if self.assets {
            used.push("its other files copied beside the weights".to_string());
        }
        format!(
            "note: NeMo's {} found: {} (--no-hf-metadata turns this off)",
            self.folder,
            used.join(", ")
        )
    }
}

/// `config` with what INPUT_DIR's `.hf_metadata` provides filled in where
/// the command line left it open, and what was taken; `None` when there
/// is no such folder.
pub fn apply(config: &Config) -> Option<(Config, Taken)> {
    let folder = config.input.join(FOLDER);
    if !folder.is_dir() {
        return None;
    }
    let mut config = config.clone();
    let mut taken = Taken {
        folder: folder.display().to_string(),
        ..Taken::default()
    };
    let file = |name: &str| Some(folder.join(name)).filter(|p| p.exists());
    if let (MappingSource::SingleFile, Some(path)) = (&config.plan.mapping, file(MAPPING)) {
        taken.mapping = Some(shown_name(&path));
        config.plan.mapping = MappingSource::Mapping(path);
    }
    if let (DtypeMapSource::None, Some(path)) = (&config.plan.dtype_map, file(DTYPE_MAP)) {
        taken.dtype_map = Some(shown_name(&path));
        config.plan.dtype_map = DtypeMapSource::File(path);
    }
    if config.hf_assets.is_none() {
        config.hf_assets = Some(folder.clone());
        taken.assets = true;
    }
    Some((config, taken))
}

fn shown_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
