//! What the `.metadata` reader keeps alive while it reads (issue 20): on a
//! pickle written the way Python's pickler writes DCP's metadata (every
//! value memoized, repeated strings and classes fetched from the memo), the
//! interpreter's arena and kept memo entries stay the same size however
//! many chunks the file holds. Asserted on the interpreter's counters.

use st_consolidate_mpi::checkpoint::dcp::metadata::{ReadCounters, parse_metadata_counted};
use std::collections::HashMap;

const DCP: &str = "torch.distributed.checkpoint.metadata";
const FILESYSTEM: &str = "torch.distributed.checkpoint.filesystem";

/// Writes protocol-4 opcodes as Python's pickler does: `MEMOIZE` after
/// every string, global, tuple, dict, list and object, and a `BINGET` /
/// `LONG_BINGET` when a string or global is written again.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo: HashMap<String, u32>,
    count: u32,
}

impl Pickler {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    fn memoize(&mut self) -> &mut Self {
        self.count += 1;
        self.op(&[0x94])
    }
    fn fetch(&mut self, index: u32) -> &mut Self {
        match u8::try_from(index) {
            Ok(small) => self.op(&[b'h', small]),
            Err(_) => self.op(b"j").op(&index.to_le_bytes()),
        }
    }
    /// A value written once and fetched from the memo after that.
    fn shared(&mut self, key: String, write: impl FnOnce(&mut Self)) -> &mut Self {
        if let Some(&index) = self.memo.get(&key) {
            return self.fetch(index);
        }
        write(self);
        self.memo.insert(key, self.count);
        self.memoize()
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.shared(format!("str:{s}"), |p| {
            p.op(&[0x8c, s.len() as u8]).op(s.as_bytes());
        })
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.shared(format!("global:{module}.{name}"), |p| {
            p.op(format!("c{module}\n{name}\n").as_bytes());
        })
    }
    fn int(&mut self, n: u32) -> &mut Self {
        self.op(b"J").op(&n.to_le_bytes())
    }
    /// `torch.Size((a, b))`: `REDUCE` of the class and a one-tuple.
    fn size(&mut self, a: u32, b: u32) -> &mut Self {
        self.global("torch", "Size").int(a).int(b).op(&[0x86]);
        self.memoize().op(&[0x85]).memoize().op(b"R").memoize()
    }
    /// A dataclass: `NEWOBJ` of the class with `()`, then its attribute
    /// dict, filled by `attributes`, and `BUILD`.
    fn object(&mut self, module: &str, class: &str, attributes: impl FnOnce(&mut Self)) {
        self.global(module, class).op(b")\x81");
        self.memoize().op(b"}").memoize().op(b"(");
        attributes(self);
        self.op(b"ub");
    }
}

/// A `.metadata` of `tensors` float32 tensors of shape [512, 4], each saved
/// as 512 one-row chunks, one per rank's file, with every chunk's
/// storage_data entry.
fn fsdp_metadata(tensors: u32) -> Vec<u8> {
    const RANKS: u32 = 512;
    let mut p = Pickler::default();
    p.op(b"\x80\x04");
    p.object(DCP, "Metadata", |p| {
        p.text("state_dict_metadata").op(b"}").memoize().op(b"(");
        for t in 0..tensors {
            p.text(&format!("layers.{t}.weight"));
            p.object(DCP, "TensorStorageMetadata", |p| {
                p.text("properties");
                p.global(DCP, "TensorProperties")
                    .op(b")\x81")
                    .memoize()
                    .op(b"(");
                p.global("torch", "float32").op(b"N\x89N\x89");
                p.op(b"t").memoize().op(b"b");
                p.text("size").size(RANKS, 4);
                p.text("chunks").op(b"]").memoize();
                // Python's pickler appends in batches of 1,000.
                p.op(b"(");
                for row in 0..RANKS {
                    p.object(DCP, "ChunkStorageMetadata", |p| {
                        p.text("offsets").size(row, 0).text("sizes").size(1, 4);
                    });
                }
                p.op(b"e");
            });
        }
        p.op(b"u");
        p.text("storage_data").op(b"}").memoize();
        for t in 0..tensors {
            p.op(b"(");
            for row in 0..RANKS {
                p.object(DCP, "MetadataIndex", |p| {
                    p.text("fqn").text(&format!("layers.{t}.weight"));
                    p.text("offset").size(row, 0).text("index").int(0);
                });
                p.object(FILESYSTEM, "_StorageInfo", |p| {
                    p.text("relative_path").text(&format!("__{row}_0.distcp"));
                    p.text("offset").int(t * 1024).text("length").int(1024);
                });
            }
            p.op(b"u");
        }
    });
    p.op(b".");
    p.out
}

fn read(tensors: u32) -> ReadCounters {
    let bytes = fsdp_metadata(tensors);
    let (parsed, counters) = parse_metadata_counted(&bytes);
    let metadata = parsed.expect("a well-formed metadata is read");
    let chunks: Vec<_> = metadata.tensors().flat_map(|t| &t.chunks).collect();
    assert_eq!(chunks.len(), tensors as usize * 512);
    assert!(chunks.iter().all(|chunk| chunk.storage.is_some()));
    assert_eq!(metadata.files.len(), 512);
    counters
}

#[test]
fn the_interpreter_keeps_what_is_alive_not_what_the_file_holds() {
    let small = read(4);
    let large = read(40);
    assert_eq!(large.pieces, 40 * 512, "{large:?}");
    // Python memoized every value: 10 entries or more a chunk ...
    assert!(large.memo_defined as u64 >= 10 * large.pieces, "{large:?}");
    // ... of which only the fetched strings and classes are kept: the
    // attribute names, the classes, each name and each file's name.
    assert!(large.memo_kept <= 40 + 512 + 32, "{large:?}");
    // Nodes are retired as their objects are read: besides the kept
    // strings, the arena holds a handful of values at once, as many for
    // 20,480 chunks as for 2,048.
    let beyond_memo = |c: &ReadCounters| c.arena_slots - c.memo_kept;
    assert_eq!(
        beyond_memo(&large),
        beyond_memo(&small),
        "{small:?} {large:?}"
    );
    assert!(beyond_memo(&large) < 32, "{large:?}");
    // What was built is still counted in full.
    assert!(large.values > 9 * large.pieces, "{large:?}");
}
