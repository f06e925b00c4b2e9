//! The `.metadata` reader's cost is bounded by its input (issue 20):
//! crafted files that share parts through the pickle memo are refused
//! quickly, asserted on the interpreter's counters (values built, bytes
//! charged, chunks built, attribute pairs looked at), never on time. And
//! planner_data's top-level keys are read from real PyTorch checkpoints.

use st_consolidate_mpi::checkpoint::dcp::metadata::{ReadCounters, parse_metadata_counted};
use st_consolidate_mpi::checkpoint::dcp::read_dcp_checkpoint;
use std::path::PathBuf;

const DCP: &str = "torch.distributed.checkpoint.metadata";

/// Protocol-2 pickle pieces, as Python's pickler writes them, with memo
/// slots the tests choose.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, n: u32) -> &mut Self {
        self.op(b"J").op(&n.to_le_bytes())
    }
    fn put(&mut self, slot: u32) -> &mut Self {
        self.op(b"r").op(&slot.to_le_bytes())
    }
    fn get(&mut self, slot: u32) -> &mut Self {
        if slot < 256 {
            self.op(&[b'h', slot as u8])
        } else {
            self.op(b"j").op(&slot.to_le_bytes())
        }
    }
    /// `torch.Size((dims...))`.
    fn size(&mut self, dims: &[u32]) -> &mut Self {
        self.global("torch", "Size").op(b"(");
        for &d in dims {
            self.int(d);
        }
        self.op(b"t\x85R")
    }
    /// Starts a DCP dataclass: `cls()` then a dict to fill; end with `end`.
    fn object(&mut self, class: &str) -> &mut Self {
        self.global(DCP, class).op(b")\x81}(")
    }
    fn end(&mut self) -> &mut Self {
        self.op(b"ub")
    }
    /// A ChunkStorageMetadata of one row `row` of a [rows, 4] tensor.
    fn chunk(&mut self, row: u32) -> &mut Self {
        self.object("ChunkStorageMetadata")
            .text("offsets")
            .size(&[row, 0])
            .text("sizes")
            .size(&[1, 4])
            .end()
    }
    /// TensorProperties of float32, in its `__getstate__` tuple form.
    fn properties(&mut self) -> &mut Self {
        self.global(DCP, "TensorProperties")
            .op(b")\x81(")
            .global("torch", "float32")
            .op(b"N\x89N\x89tb")
    }
    /// The start of a TensorStorageMetadata of shape [rows, 4], up to its
    /// chunks list (the caller adds the list and calls `end`).
    fn tensor_head(&mut self, rows: u32) -> &mut Self {
        self.object("TensorStorageMetadata")
            .text("properties")
            .properties()
            .text("size")
            .size(&[rows, 4])
            .text("chunks")
    }
    /// `Metadata(state_dict_metadata=<what `entries` writes>, storage_data={})`.
    fn metadata(entries: impl FnOnce(&mut Pickle)) -> Vec<u8> {
        let mut p = Pickle::default();
        p.op(b"\x80\x02")
            .object("Metadata")
            .text("state_dict_metadata")
            .op(b"}(");
        entries(&mut p);
        p.op(b"u").text("storage_data").op(b"}").end().op(b".");
        p.0
    }
}

fn refused(bytes: &[u8]) -> (String, ReadCounters) {
    let (result, counters) = parse_metadata_counted(bytes);
    let err = result.expect_err("a crafted file must be refused");
    (err.to_string(), counters)
}

/// What a parse of `input` bytes may build at most, whatever they hold: the
/// interpreter's own charge per input byte is far below these.
fn assert_linear(counters: &ReadCounters) {
    let input = counters.input as u64;
    assert!(counters.values <= input, "{counters:?}");
    assert!(counters.bytes as u64 <= 40 * input, "{counters:?}");
    assert!(counters.pieces <= input / 16 + 1, "{counters:?}");
    assert!(counters.attribute_pairs <= input / 2, "{counters:?}");
}

#[test]
fn entries_sharing_one_tensor_entry_are_refused_without_expanding_it() {
    // Hostile case 1: 10,000 entries share one TensorStorageMetadata (memo
    // slot 0) holding 1,000 distinct chunks: 10 million pieces claimed.
    let bytes = Pickle::metadata(|p| {
        p.text("t0").tensor_head(1000).op(b"](");
        for row in 0..1000 {
            p.chunk(row);
        }
        p.op(b"e").end().put(0);
        for i in 1..10_000 {
            p.text(&format!("t{i}")).get(0);
        }
    });
    let (err, counters) = refused(&bytes);
    assert!(err.contains("shares its TensorStorageMetadata"), "{err}");
    assert_eq!(counters.pieces, 1000, "built once: {counters:?}");
    assert_linear(&counters);
}

#[test]
fn a_chunk_list_repeating_one_chunk_is_refused_at_the_second() {
    // Hostile case 1's chunk list and case 3: one chunk object (memo slot
    // 1) appended 1,000,000 times through the memo, a 2 MB file.
    let bytes = Pickle::metadata(|p| {
        p.text("w")
            .tensor_head(1_000_000)
            .op(b"]")
            .chunk(0)
            .put(1)
            .op(b"a");
        for _ in 0..999 {
            p.op(b"(");
            for _ in 0..1000 {
                p.get(1);
            }
            p.op(b"e");
        }
        p.end();
    });
    assert!(bytes.len() < 2_100_000, "{}", bytes.len());
    let (err, counters) = refused(&bytes);
    assert!(err.contains("entry 'w'"), "{err}");
    assert!(err.contains("[0:1, 0:4] is listed twice"), "{err}");
    // The list is one value of a million references; nothing per reference.
    assert!(counters.values < 100, "{counters:?}");
    assert!(counters.bytes < 17 * 1_000_000 + 10_000, "{counters:?}");
    assert_eq!(counters.folded, 5, "{counters:?}");
}

#[test]
fn lists_of_shared_chunks_claiming_more_than_the_file_holds_are_refused() {
    // 1,000 distinct chunks (memo slots 0..1000), then tensors each listing
    // all of them again through the memo: 5 bytes a piece, against the 16
    // a real chunk costs at least.
    let bytes = Pickle::metadata(|p| {
        p.text("t0").tensor_head(1000).op(b"](");
        for row in 0..1000 {
            p.chunk(row).put(row);
        }
        p.op(b"e").end();
        for i in 1..400 {
            p.text(&format!("t{i}")).tensor_head(1000).op(b"](");
            for row in 0..1000 {
                p.get(row);
            }
            p.op(b"e").end();
        }
    });
    let (err, counters) = refused(&bytes);
    let input = bytes.len();
    assert!(
        err.contains(&format!("more than a {input}-byte .metadata can describe")),
        "{err}"
    );
    assert!(err.contains("claims at least"), "{err}");
    assert!(
        counters.pieces <= (input / 16) as u64 + 1000,
        "{counters:?}"
    );
    assert_linear(&counters);
}

#[test]
fn entries_sharing_one_attribute_dictionary_are_refused_after_one_pass() {
    // Hostile case 2: entries whose TensorStorageMetadata share one
    // attribute dict (memo slot 5) holding 200,000 junk keys besides the
    // real ones. The dict is read once; its second use is refused.
    let bytes = Pickle::metadata(|p| {
        p.text("t0")
            .global(DCP, "TensorStorageMetadata")
            .op(b")\x81}")
            .put(5);
        p.op(b"(")
            .text("properties")
            .properties()
            .text("size")
            .size(&[1, 4])
            .text("chunks")
            .op(b"]")
            .chunk(0)
            .op(b"a");
        // Python's pickler sets items in batches of 1,000.
        for k in 0..200_000 {
            if k % 1000 == 999 {
                p.op(b"u(");
            }
            p.text(&format!("{k:x}")).op(b"N");
        }
        p.op(b"ub");
        for i in 1..1000 {
            p.text(&format!("t{i}"))
                .global(DCP, "TensorStorageMetadata")
                .op(b")\x81")
                .get(5)
                .op(b"b");
        }
    });
    let (err, counters) = refused(&bytes);
    assert!(err.contains("used again through the pickle memo"), "{err}");
    assert!(counters.attribute_pairs < 200_100, "{counters:?}");
    assert_linear(&counters);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn a_real_metadata_is_read_with_its_counters_in_proportion() {
    let bytes = std::fs::read(fixture("torch-dcpfs-w2/checkpoint/.metadata")).unwrap();
    let (metadata, counters) = parse_metadata_counted(&bytes);
    let metadata = metadata.unwrap();
    let chunks: usize = metadata.tensors().map(|t| t.chunks.len()).sum();
    assert_eq!(counters.pieces, chunks as u64);
    assert!(chunks > 10, "{chunks}");
    // Every chunk's ChunkStorageMetadata, MetadataIndex and _StorageInfo
    // objects were taken as they were read.
    assert!(counters.folded as usize >= 3 * chunks, "{counters:?}");
    assert!(
        metadata
            .tensors()
            .all(|t| t.chunks.iter().all(|c| c.storage.is_some()))
    );
    assert_linear(&counters);
}

#[test]
fn planner_data_gives_the_top_level_key_of_nested_state_dicts() {
    // dcp.save({"model": sd}): every tensor under `model`.
    let accelerate = read_dcp_checkpoint(&fixture("layout-accelerate")).unwrap();
    assert!(!accelerate.tensors.is_empty());
    for tensor in &accelerate.tensors {
        assert_eq!(
            accelerate
                .top_level_keys
                .get(&tensor.name)
                .map(String::as_str),
            Some("model"),
            "{}",
            tensor.name
        );
    }
    assert!(
        accelerate
            .top_level_keys
            .contains_key("model.lm_head.weight")
    );
    // torchtitan: the model flattened at the top level (no key), the
    // optimizer's state under `optimizer`.
    let titan = read_dcp_checkpoint(&fixture("layout-torchtitan")).unwrap();
    let key = |name: &str| titan.top_level_keys.get(name).map(String::as_str);
    let model = titan
        .tensors
        .iter()
        .find(|t| !t.name.starts_with("optimizer"))
        .unwrap();
    assert_eq!(key(&model.name), None, "{}", model.name);
    let optimizer: Vec<_> = titan
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("optimizer."))
        .collect();
    assert!(!optimizer.is_empty());
    for tensor in optimizer {
        assert_eq!(key(&tensor.name), Some("optimizer"), "{}", tensor.name);
    }
}

#[test]
fn the_memo_heavy_fuzz_seeds_are_read_or_refused_as_expected() {
    // fuzz/seeds/pickle (scripts/make_fuzz_seeds.py): pickled by Python
    // with parts shared through the memo; only the plain ones are DCP's;
    // the ds- ones are DeepSpeed's.
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/pickle");
    let mut seen = 0;
    for entry in std::fs::read_dir(seeds).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (result, counters) = parse_metadata_counted(&std::fs::read(&path).unwrap());
        assert_linear(&counters);
        let stem = name.trim_end_matches(".pkl");
        let kind = stem.rsplit_once("-p").map_or(stem, |(kind, _)| kind);
        if name.starts_with("ds-") {
            // DeepSpeed's pickles (src/checkpoint/deepspeed reads them): no
            // .metadata, but read linearly all the same.
            assert!(result.is_err(), "{name}");
            seen += 1;
            continue;
        }
        let expected = match kind {
            "plain" | "real-w2" => None,
            // 32 tensors listing the same 32 chunks: more than the file holds.
            "shared-chunks" => Some("-byte .metadata can describe"),
            "shared-entry" => Some("shares its TensorStorageMetadata"),
            "repeated-chunk" => Some("is listed twice"),
            "shared-list" | "shared-attributes" => Some("used again through the pickle memo"),
            other => panic!("unexpected seed {other}"),
        };
        match (expected, result) {
            (None, Ok(_)) => {}
            (Some(needle), Err(err)) => assert!(err.to_string().contains(needle), "{name}: {err}"),
            (expected, result) => panic!("{name}: expected {expected:?}, got {result:?}"),
        }
        seen += 1;
    }
    assert!(seen >= 12, "{seen}");
}
