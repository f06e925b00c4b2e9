//! A pass over the opcodes before the parse, building nothing: which memo
//! entries the pickle fetches (`BINGET`, `LONG_BINGET`). Python's pickler
//! memoizes nearly every value it writes, so a DCP `.metadata` of 582k
//! chunks puts 8.7 million memo entries but fetches a few thousand (the
//! attribute names, each fqn, each file name); the machine keeps only
//! those.
//!
//! The scan only ever makes the machine keep more: if it misreads an
//! opcode (a crafted file), a fetch it missed finds no entry and the parse
//! is refused as a missing memo entry, never given another value.

use super::input::Input;
use std::collections::HashSet;

/// Memo indices below this are kept in a bitmap (16 MiB at most); above,
/// in a set. Python numbers entries from 0, so real files stay below.
const DENSE_LIMIT: u64 = 1 << 27;

/// More fetched indices above [`DENSE_LIMIT`] than this and the scan gives
/// up listing them: every entry is then kept, as if all were fetched.
const MAX_SPARSE: usize = 1 << 16;

/// A set of memo indices: a bitmap for small ones, a hash set for the rest.
#[derive(Debug, Default)]
pub(super) struct IndexSet {
    dense: Vec<u64>,
    sparse: HashSet<u64>,
}

impl IndexSet {
    /// Adds `index`; says whether it was new, and how many bytes the set
    /// grew by (for the memory charge).
    pub(super) fn insert(&mut self, index: u64) -> (bool, usize) {
        if index >= DENSE_LIMIT {
            let grew = size_of::<u64>() * 2;
            return (self.sparse.insert(index), grew);
        }
        let (word, bit) = ((index / 64) as usize, index % 64);
        let mut grew = 0;
        if word >= self.dense.len() {
            grew = (word + 1 - self.dense.len()) * size_of::<u64>();
            self.dense.resize(word + 1, 0);
        }
        let new = self.dense[word] & (1 << bit) == 0;
        self.dense[word] |= 1 << bit;
        (new, grew)
    }

    pub(super) fn contains(&self, index: u64) -> bool {
        if index >= DENSE_LIMIT {
            return self.sparse.contains(&index);
        }
        self.dense
            .get((index / 64) as usize)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }
}

/// Which memo entries are fetched: a list, or all of them.
#[derive(Debug)]
pub(super) enum Fetched {
    All,
    Listed(IndexSet),
}

impl Fetched {
    /// Whether the entry at `index` may be fetched, so must be kept.
    pub(super) fn keeps(&self, index: u64) -> bool {
        match self {
            Fetched::All => true,
            Fetched::Listed(set) => set.contains(index),
        }
    }
}

/// Lists the memo entries the pickle fetches, reading opcodes up to `STOP`
/// or to the first opcode the machine does not run (it refuses there
/// anyway), or to a read error (the parse meets it too).
pub(super) fn fetched_memo_entries(input: &mut Input) -> Fetched {
    let mut fetched = IndexSet::default();
    let le = |input: &mut Input, width: u64| -> Option<u64> {
        let bytes = input.take(width).ok()?;
        let mut wide = [0u8; 8];
        wide[..bytes.len()].copy_from_slice(bytes);
        Some(u64::from_le_bytes(wide))
    };
    while let Ok(Some(op)) = input.next_byte() {
        // Bytes of operands after the opcode, or None to stop.
        let skip = match op {
            b'h' | b'j' => {
                let Some(index) = le(input, if op == b'h' { 1 } else { 4 }) else {
                    break;
                };
                fetched.insert(index);
                if fetched.sparse.len() > MAX_SPARSE {
                    return Fetched::All;
                }
                Some(0)
            }
            b'.' => None,
            // No operand.
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | 0x88
            | 0x89
            | b')'
            | b']'
            | b'}'
            | 0x8f
            | b't'
            | 0x85..=0x87
            | b'l'
            | b'd'
            | 0x91
            | b'a'
            | b'e'
            | b's'
            | b'u'
            | 0x90
            | 0x94
            | 0x93
            | b'R'
            | 0x81
            | 0x92
            | b'b'
            | b'Q' => Some(0),
            // Fixed operands: PROTO, BININT1, BINPUT; BININT2; BININT,
            // LONG_BINPUT; FRAME, BINFLOAT.
            0x80 | b'K' | b'q' => Some(1),
            b'M' => Some(2),
            b'J' | b'r' => Some(4),
            0x95 | b'G' => Some(8),
            // A length, then that many bytes.
            0x8a | b'U' | 0x8c | b'C' => le(input, 1),
            0x8b | b'T' | b'X' | b'B' => le(input, 4),
            0x8d | 0x8e | 0x96 => le(input, 8),
            // GLOBAL: two newline-terminated lines (of at most 1 KiB).
            b'c' => {
                let lines = input.peek(2050).unwrap_or_default();
                let mut ends = lines.iter().enumerate().filter(|(_, b)| **b == b'\n');
                ends.nth(1).map(|(at, _)| at as u64 + 1)
            }
            _ => None,
        };
        match skip {
            Some(len) if input.skip(len).unwrap_or(false) => {}
            _ => break,
        }
    }
    Fetched::Listed(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(mut pickle: &[u8]) -> Fetched {
        let len = pickle.len();
        fetched_memo_entries(&mut Input::new(&mut pickle, len))
    }

    #[test]
    fn only_fetched_entries_are_listed() {
        // PROTO 2, 'ab' MEMOIZE, 'cd' BINPUT 7, LONG_BINGET 0, BINGET 7, tuple, STOP.
        let pickle = b"\x80\x02\x8c\x02ab\x94\x8c\x02cdq\x07j\x00\x00\x00\x00h\x07\x86.";
        let Fetched::Listed(set) = scan(pickle) else {
            panic!("listed");
        };
        assert!(set.contains(0) && set.contains(7));
        assert!(!set.contains(1) && !set.contains(2));
    }

    #[test]
    fn operands_that_look_like_fetches_are_skipped() {
        // A string whose bytes are BINGET 9, a GLOBAL line with 'h', then BINGET 3.
        let pickle = b"\x80\x02\x8c\x02h\x09ctorch\nSize\nh\x03.";
        let Fetched::Listed(set) = scan(pickle) else {
            panic!("listed");
        };
        assert!(set.contains(3) && !set.contains(9));
    }

    #[test]
    fn many_sparse_fetches_keep_everything() {
        let mut pickle = b"\x80\x02".to_vec();
        for i in 0..=MAX_SPARSE as u32 {
            pickle.push(b'j');
            pickle.extend_from_slice(&(u32::MAX - i).to_le_bytes());
        }
        assert!(matches!(scan(&pickle), Fetched::All));
    }
}
