//! `--include` and `--exclude`: which tensors of a checkpoint to export, by
//! glob patterns over the names as saved (before `--strip-prefix`), so that
//! optimizer state beside the model can be left out.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result, shown};
use std::path::Path;

/// The tensors to export: those matching any `include` pattern (all, when
/// there is none) and no `exclude` pattern.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// `--include` patterns.
    pub include: Vec<String>,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
}

impl Selection {
    /// Whether the tensor named `name` is exported.
    pub fn keeps(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| glob_match(p, name)))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }

    /// Moves the tensors this selection leaves out of `checkpoint.tensors`
    /// into `checkpoint.excluded`.
    pub fn apply(&self, checkpoint: &mut Checkpoint) {
        let (kept, left_out) = std::mem::take(&mut checkpoint.tensors)
            .into_iter()
            .partition(|t| self.keeps(&t.name));
        checkpoint.tensors = kept;
        checkpoint.excluded.extend(
            left_out
                .into_iter()
                .map(|t: crate::checkpoint::FullTensor| (t.name.clone(), t.byte_len())),
        );
    }
}

impl Selection {
    /// Refuses a selection that leaves nothing to export (a typo such as
    /// `--include 'modle.*'` must not publish an empty model), naming the
    /// prefixes the checkpoint does hold.
    pub fn check_leaves_some(&self, checkpoint: &Checkpoint) -> Result<()> {
        if !checkpoint.tensors.is_empty() || checkpoint.excluded.is_empty() {
            return Ok(());
        }
        let mut prefixes: Vec<String> = checkpoint
            .excluded
            .iter()
            .map(|(name, _)| match name.split_once('.') {
                Some((first, _)) => format!("{first}.*"),
                None => name.clone(),
            })
            .collect();
        prefixes.sort();
        prefixes.dedup();
        let patterns = |flag: &str, list: &[String]| {
            list.iter()
                .map(|p| format!("{flag} '{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Err(Error::usage(
            format!(
                "{} {} leave(s) none of the checkpoint's {} tensors to export; its names start with {}",
                patterns("--include", &self.include),
                patterns("--exclude", &self.exclude),
                checkpoint.excluded.len(),
                prefixes.join(", ")
            ),
            "check the patterns (`*` matches any characters, `?` one, over the whole saved name); --dry-run lists the name prefixes",
        ))
    }
}

impl Selection {
    /// One warning for the `--include`/`--exclude` patterns that match no
    /// saved name (tensor or non-tensor entry), naming for each the saved
    /// names it would match once their top-level key (accelerate's
    /// `model.`) or a `--strip-prefix` is taken off, with the pattern that
    /// matches them as saved. Globs keep matching the saved names: a user
    /// who typed the name that will be written gets told, not guessed at.
    pub fn unmatched_warning(
        &self,
        checkpoint: &Checkpoint,
        strip_prefixes: &[String],
    ) -> Option<String> {
        let saved: Vec<&str> = checkpoint
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .chain(checkpoint.excluded.iter().map(|(name, _)| name.as_str()))
            .chain(checkpoint.non_tensors.iter().map(String::as_str))
            .collect();
        // The prefixes a written name may lose: each tensor's top-level
        // key, then each --strip-prefix.
        let taken_off = |name: &str| -> Vec<String> {
            let key = checkpoint
                .top_level_keys
                .get(name)
                .map(|key| format!("{key}."))
                .filter(|key| name.starts_with(key.as_str()));
            key.into_iter()
                .chain(strip_prefixes.iter().cloned())
                .filter(|prefix| !prefix.is_empty() && name.starts_with(prefix.as_str()))
                .collect()
        };
        let mut parts = Vec::new();
        let patterns = self
            .include
            .iter()
            .map(|p| ("--include", p))
            .chain(self.exclude.iter().map(|p| ("--exclude", p)));
        for (flag, pattern) in patterns {
            if saved.iter().any(|name| glob_match(pattern, name)) {
                continue;
            }
            let mut would: Vec<String> = Vec::new();
            let mut suggested: Vec<String> = Vec::new();
            for name in &saved {
                for prefix in taken_off(name) {
                    if glob_match(pattern, &name[prefix.len()..]) {
                        would.push(name.to_string());
                        let with = format!("{flag} '{}{}'", shown(&prefix), shown(pattern));
                        if !suggested.contains(&with) {
                            suggested.push(with);
                        }
                        break;
                    }
                }
            }
            let mut part = format!("{flag} '{}' matches no saved name", shown(pattern));
            if !would.is_empty() {
                part.push_str(&format!(
                    "; it would match {} once the top-level key or --strip-prefix is taken \
                     off: {} matches {}",
                    crate::error::list_names(&would),
                    suggested.join(" or "),
                    if would.len() == 1 { "it" } else { "them" }
                ));
            }
            parts.push(part);
        }
        if parts.is_empty() {
            return None;
        }
        Some(format!(
            "warning: {} (globs match saved names, as the checkpoint holds them before the \
             top-level key or --strip-prefix is taken off; --dry-run lists their prefixes)",
            parts.join("; ")
        ))
    }
}

/// Refuses a checkpoint that holds no tensor at all (a DCP checkpoint of
/// only a step count and dataloader state, or shards without tensors): an
/// empty model and index must not be published as a success. Named with
/// the non-tensor entries it does hold. A selection that leaves nothing is
/// [`Selection::check_leaves_some`]'s to refuse, naming the patterns.
pub fn check_has_tensors(dir: &Path, checkpoint: &Checkpoint) -> Result<()> {
    if !checkpoint.tensors.is_empty() || !checkpoint.excluded.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 8;
    let entries = &checkpoint.non_tensors;
    let only = match entries.len() {
        0 => String::new(),
        n => {
            let mut listed: Vec<String> = entries
                .iter()
                .take(SHOWN)
                .map(|e| shown(e).into_owned())
                .collect();
            if n > SHOWN {
                listed.push(format!("... and {} more", n - SHOWN));
            }
            let plural = if n == 1 { "y" } else { "ies" };
            format!(
                ", only {n} non-tensor entr{plural} (not weights): {}",
                listed.join(", ")
            )
        }
    };
    Err(Error::usage(
        format!(
            "INPUT_DIR {} holds no tensors{only}: nothing to export",
            dir.display()
        ),
        "pass the folder of a checkpoint that saved the model's weights (the state dict's tensors)",
    ))
}

/// Shell-style matching of a whole name: `*` matches any run of characters
/// (dots included, so `optim.*` matches every optimizer tensor), `?` any one
/// character; everything else matches itself. Iterative, with backtracking
/// to the last `*` only, so it is linear in practice and never recursive.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("optim.*", "optim.state.model.w.exp_avg"));
        assert!(!glob_match("optim.*", "model.optim.x"));
        assert!(glob_match("*.weight", "model.layers.0.mlp.up_proj.weight"));
        assert!(!glob_match("*.weight", "model.norm.bias"));
        assert!(glob_match("model.layers.?.*", "model.layers.3.x"));
        assert!(!glob_match("model.layers.?.*", "model.layers.12.x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn a_selection_that_leaves_nothing_is_refused_naming_the_prefixes() {
        let mut checkpoint = Checkpoint {
            excluded: vec![("model.w".into(), 4), ("optim.m".into(), 4)],
            ..Checkpoint::default()
        };
        let select = Selection {
            include: vec!["modle.*".into()],
            exclude: vec![],
        };
        let err = select
            .check_leaves_some(&checkpoint)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--include 'modle.*'") && err.contains("model.*, optim.*"),
            "{err}"
        );
        checkpoint.tensors.push(crate::checkpoint::FullTensor {
            name: "model.w".into(),
            dtype: crate::safetensors::dtype::Dtype::U8,
            shape: vec![4],
            pieces: vec![],
        });
        assert!(select.check_leaves_some(&checkpoint).is_ok());
    }

    #[test]
    fn a_checkpoint_without_tensors_is_refused_naming_its_entries() {
        let mut checkpoint = Checkpoint {
            non_tensors: vec!["step".into(), "extra.lr".into()],
            ..Checkpoint::default()
        };
        let err = check_has_tensors(Path::new("ck"), &checkpoint)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "INPUT_DIR ck holds no tensors, only 2 non-tensor entries (not weights): step, extra.lr: nothing to export"
            ),
            "{err}"
        );
        checkpoint.non_tensors.clear();
        let err = check_has_tensors(Path::new("ck"), &checkpoint)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("INPUT_DIR ck holds no tensors: nothing to export"),
            "{err}"
        );
        // Tensors left out by a selection: the selection's message instead.
        checkpoint.excluded.push(("model.w".into(), 4));
        assert!(check_has_tensors(Path::new("ck"), &checkpoint).is_ok());
    }

    #[test]
    fn include_then_exclude() {
        let select = Selection {
            include: vec!["model.*".into(), "lm_head.*".into()],
            exclude: vec!["*.bias".into()],
        };
        assert!(select.keeps("model.embed_tokens.weight"));
        assert!(select.keeps("lm_head.weight"));
        assert!(!select.keeps("model.norm.bias"));
        assert!(!select.keeps("optim.state.x"));
        assert!(Selection::default().keeps("anything"));
    }

    proptest! {
        /// A pattern without wildcards matches exactly itself, and `*`
        /// around any substring of a name matches it.
        #[test]
        fn literals_and_substrings(name in "[a-z._0-9]{0,12}", a in 0usize..12, b in 0usize..12) {
            prop_assert!(glob_match(&name, &name));
            let (lo, hi) = (a.min(b).min(name.len()), a.max(b).min(name.len()));
            let pattern = format!("*{}*", &name[lo..hi]);
            prop_assert!(glob_match(&pattern, &name));
            let prefix = format!("{}*", &name[..hi]);
            prop_assert!(glob_match(&prefix, &name));
            prop_assert_eq!(glob_match(&format!("{name}x"), &name), false);
        }
    }
}
