//! `--include` and `--exclude`: which tensors of a checkpoint to export, by
//! glob patterns over the names as saved (before `--strip-prefix`), so that
//! optimizer state beside the model can be left out.

use crate::checkpoint::Checkpoint;

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
