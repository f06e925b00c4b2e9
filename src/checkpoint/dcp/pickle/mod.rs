//! A Python pickle reader that builds values and never runs anything.
//!
//! DCP's `.metadata` and every chunk's `data.pkl` are pickles. Loading a
//! pickle in Python calls whatever its globals name, so a checkpoint from an
//! untrusted source can run code. This reader only builds a tree of values:
//! a global is accepted only if it is on a fixed allowlist (DCP's metadata
//! classes, torch dtypes, tensor rebuild functions, ...) and is refused by
//! name the moment the opcode naming it is read; calling (`REDUCE`,
//! `NEWOBJ`) and `BUILD` on an allowed class just record an [`Object`].
//!
//! Values live in an arena and refer to each other by index, so a memo
//! lookup (`BINGET`) copies an index, not a subtree: the work and memory of
//! a parse are linear in the input's size whatever the input.
//!
//! Memory follows what is alive, not what was built. Before the parse, a
//! scan of the opcodes ([`scan`]) lists the memo entries the pickle ever
//! fetches: Python's pickler memoizes nearly every value it writes, but a
//! DCP `.metadata` fetches a few thousand of its millions, and only those
//! are kept. Retired nodes free their slot in the arena for the next value,
//! and an id carries its slot's generation, so a stale id (a memo entry or
//! stack copy of a retired node) is still seen as retired, never as the
//! slot's new value.
//!
//! A reader that knows what the pickle holds passes a [`Fold`]: each object
//! is handed to it as soon as it is complete (at `BUILD`, or at `REDUCE` for
//! objects built from their arguments), and the reader may take it into a
//! model of its own. The object then becomes the model's id: a
//! [`Value::Folded`], its slot freed, or a [`Node::Folded`] when a kept
//! memo entry names it; the parts it was built from are retired
//! ([`Node::Spent`], their slots freed), so no value tree of the whole file is ever kept, and a part
//! shared through the memo by two objects is refused instead of being
//! expanded twice. [`Counters`] record what a parse built.

mod allowlist;
mod error;
mod input;
mod machine;
mod scan;
mod stack;
#[cfg(test)]
mod tests;

pub use allowlist::{allowed_global, allowlist};
pub use error::{PickleError, PickleErrorKind};
use input::Input;
use machine::Machine;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};

/// Caps on what one parse may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted input, in bytes.
    pub max_input: usize,
    /// Most values on the stack at once.
    pub max_stack: usize,
    /// Most MARKs open at once (how deeply `(`-delimited groups nest).
    pub max_marks: usize,
    /// Most bytes the built values may take. Opcodes of one or two bytes
    /// create nodes of tens of bytes, so without this a crafted pickle near
    /// `max_input` could need tens of GB.
    pub max_memory: usize,
}

impl Limits {
    /// For `.metadata`. A large FSDP run (1,000 tensors × 1,000 ranks, with
    /// optimizer state) pickles a few hundred MB of metadata, so the cap is
    /// generous; it still stops a mistaken multi-GB file before it is read.
    /// Real metadata builds values of about 18× its size (measured on
    /// PyTorch 2.15 metadata of 300 tensors × 256 chunks: 11 MB, 145 bytes a
    /// chunk), so the memory cap admits about 450 MB of metadata (3 million
    /// chunks) while bounding what a crafted file can make us allocate.
    /// Python's pickler batches containers by 1,000 items and nests a few
    /// levels, so real metadata stays far below the stack and mark caps.
    pub const METADATA: Limits = Limits {
        max_input: 1 << 30,
        max_stack: 1 << 17,
        max_marks: 512,
        max_memory: 8 << 30,
    };

    /// For a chunk's `data.pkl`: one rebuild call of a few hundred bytes.
    pub const DATA_PKL: Limits = Limits {
        max_input: 1 << 20,
        max_stack: 1 << 12,
        max_marks: 64,
        max_memory: 16 << 20,
    };
}

/// A [`Node`] of a [`Pickle`]'s arena: its slot, and the slot's generation
/// when the node was made (a slot is reused once its node is retired).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId {
    slot: u32,
    generation: u32,
}

/// A value: a scalar inline, or a reference to a node of the arena.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// Python's `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// Anything else: see [`Pickle::node`].
    Node(NodeId),
    /// An object a [`Fold`] took into its model, by its id there, when
    /// nothing else refers to its node (the node's slot is then reused).
    Folded(u32),
}

/// An allowlisted global, `module.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Global {
    /// The module path, e.g. `torch.distributed.checkpoint.metadata`.
    pub module: &'static str,
    /// The name inside the module, e.g. `Metadata`.
    pub name: &'static str,
}

impl Global {
    /// Whether this is `module.name`.
    pub fn is(&self, module: &str, name: &str) -> bool {
        self.module == module && self.name == name
    }
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

/// A class instance or call result that Python would have built by running
/// code; here only its ingredients are recorded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// The class or function called.
    pub class: Global,
    /// The positional arguments (a tuple node).
    pub args: Value,
    /// Keyword arguments (a dict node), from `NEWOBJ_EX` only.
    pub kwargs: Option<Value>,
    /// The state given by `BUILD`, usually a dict of attributes.
    pub state: Option<Value>,
}

/// A value that is not a scalar.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// A `str`.
    Str(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// An integer wider than 64 bits: its little-endian two's complement.
    BigInt(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order. Keys may be objects (DCP's
    /// `MetadataIndex`), so this is a list of pairs, not a map.
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A reference to an allowlisted global.
    Global(Global),
    /// A recorded call or instance.
    Object(Box<Object>),
    /// `BINPERSID`'s result: torch.save's reference to a storage record.
    PersistentId(Value),
    /// An object a [`Fold`] took into its own model: its id there.
    Folded(u32),
    /// A part of an object a [`Fold`] took (its attributes, its
    /// arguments): consumed, its memory freed. A pickle that uses it again
    /// is refused.
    Spent,
}

/// What a parse built, for the tests and for refusals that say why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Values built in the arena (strings, containers, objects, ...).
    pub values: u64,
    /// Bytes charged for them against [`Limits::max_memory`].
    pub bytes: usize,
    /// Objects a [`Fold`] took into its model.
    pub folded: u64,
    /// Slots the arena grew to: the most nodes alive at once.
    pub arena_slots: usize,
    /// Memo entries kept (those the pickle fetches), at the end.
    pub memo_kept: usize,
    /// Memo entries stored to, kept or not.
    pub memo_defined: usize,
}

/// A reader that takes completed objects into a model of its own while the
/// pickle is parsed (see the module documentation).
pub trait Fold {
    /// Called with each object as soon as it is complete; `below` is the
    /// value under it on the stack, if any in the current MARK frame (in a
    /// dict being filled, the object's key). `Ok(Some(n))` takes it: the object becomes `Folded(n)` (see the module
    /// documentation) and every node the folder pushed on `spent` is retired. `Ok(None)` leaves it as an
    /// [`Object`]. `Err` stops the parse (the folder keeps the reason).
    fn fold(
        &mut self,
        pickle: &Pickle,
        object: &Object,
        below: Option<Value>,
        spent: &mut Vec<NodeId>,
    ) -> Result<Option<u32>, FoldStop>;
}

/// A [`Fold`] refused the pickle; it holds the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldStop;

/// A parsed pickle: the arena and the root value.
#[derive(Clone, Debug)]
pub struct Pickle {
    /// Each slot's node and generation.
    slots: Vec<(Node, u32)>,
    /// Slots whose node was retired, free for the next node.
    free: Vec<u32>,
    root: Value,
}

/// What a retired node reads as.
static SPENT: Node = Node::Spent;

impl Pickle {
    /// Stores a node, in a freed slot if there is one.
    fn insert(&mut self, node: Node) -> Option<NodeId> {
        if let Some(slot) = self.free.pop() {
            let entry = &mut self.slots[slot as usize];
            entry.0 = node;
            return Some(NodeId {
                slot,
                generation: entry.1,
            });
        }
        let slot = u32::try_from(self.slots.len()).ok()?;
        self.slots.push((node, 0));
        Some(NodeId {
            slot,
            generation: 0,
        })
    }

    /// Retires a node: its slot is freed and ids of it read as spent.
    fn retire(&mut self, id: NodeId) {
        if let Some(entry) = self.slots.get_mut(id.slot as usize)
            && entry.1 == id.generation
            && !matches!(entry.0, Node::Spent)
        {
            entry.0 = Node::Spent;
            entry.1 = entry.1.wrapping_add(1);
            self.free.push(id.slot);
        }
    }

    /// The live node `id` names, for changing it.
    fn get_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        match self.slots.get_mut(id.slot as usize) {
            Some((node, generation)) if *generation == id.generation => Some(node),
            _ => None,
        }
    }

    /// The node `id` names: a retired one reads as [`Node::Spent`].
    fn get(&self, id: NodeId) -> Option<&Node> {
        match self.slots.get(id.slot as usize) {
            Some((node, generation)) if *generation == id.generation => Some(node),
            Some(_) => Some(&SPENT),
            None => None,
        }
    }

    /// The model id of a value a [`Fold`] took, whether the value carries
    /// it or its node does.
    pub fn folded(&self, value: Value) -> Option<u32> {
        match value {
            Value::Folded(id) => Some(id),
            _ => match self.node(value)? {
                Node::Folded(id) => Some(*id),
                _ => None,
            },
        }
    }

    /// The value `STOP` returned.
    pub fn root(&self) -> Value {
        self.root
    }

    /// The node a value refers to.
    pub fn node(&self, value: Value) -> Option<&Node> {
        match value {
            Value::Node(id) => self.get(id),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn str(&self, value: Value) -> Option<&str> {
        match self.node(value)? {
            Node::Str(text) => Some(text),
            _ => None,
        }
    }

    /// The value as a tuple's items.
    pub fn tuple(&self, value: Value) -> Option<&[Value]> {
        match self.node(value)? {
            Node::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The value as a list's or a tuple's items.
    pub fn sequence(&self, value: Value) -> Option<&[Value]> {
        match self.node(value)? {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// The value as a dict's pairs.
    pub fn dict(&self, value: Value) -> Option<&[(Value, Value)]> {
        match self.node(value)? {
            Node::Dict(pairs) => Some(pairs),
            _ => None,
        }
    }

    /// The value as a recorded object.
    pub fn object(&self, value: Value) -> Option<&Object> {
        match self.node(value)? {
            Node::Object(object) => Some(object.as_ref()),
            _ => None,
        }
    }

    /// The value as an allowlisted global.
    pub fn global(&self, value: Value) -> Option<Global> {
        match self.node(value)? {
            Node::Global(global) => Some(*global),
            _ => None,
        }
    }

    /// In a dict's pairs, the value of the string key `key`.
    pub fn dict_get(&self, pairs: &[(Value, Value)], key: &str) -> Option<Value> {
        pairs
            .iter()
            .find(|(k, _)| self.str(*k) == Some(key))
            .map(|(_, v)| *v)
    }

    /// A short description of a value's type, for error messages.
    pub fn describe(&self, value: Value) -> String {
        match value {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {}", if b { "True" } else { "False" }),
            Value::Int(i) => format!("int {i}"),
            Value::Float(x) => format!("float {x}"),
            Value::Folded(_) => "checkpoint object".into(),
            Value::Node(_) => match self.node(value) {
                Some(Node::Str(text)) => {
                    let shown: String = text.chars().take(60).collect();
                    format!("str {shown:?}")
                }
                Some(Node::Bytes(bytes)) => format!("bytes of length {}", bytes.len()),
                Some(Node::BigInt(_)) => "int wider than 64 bits".into(),
                Some(Node::Tuple(items)) => format!("tuple of {} items", items.len()),
                Some(Node::List(items)) => format!("list of {} items", items.len()),
                Some(Node::Dict(pairs)) => format!("dict of {} items", pairs.len()),
                Some(Node::Set(items)) => format!("set of {} items", items.len()),
                Some(Node::Global(global)) => format!("global {global}"),
                Some(Node::Object(object)) => format!("{} object", object.class),
                Some(Node::PersistentId(_)) => "persistent id".into(),
                Some(Node::Folded(_)) => "checkpoint object".into(),
                Some(Node::Spent) => {
                    "part of another object, used again through the pickle memo".into()
                }
                None => "dangling reference".into(),
            },
        }
    }
}

/// Parses a pickle into values, refusing anything outside the allowlist.
pub fn parse(data: &[u8], limits: &Limits) -> Result<Pickle, PickleError> {
    parse_folding(data, limits, None).0
}

/// Parses a pickle, handing each completed object to `fold` if given, and
/// returns what the parse built even when it refused the pickle.
pub fn parse_folding(
    data: &[u8],
    limits: &Limits,
    fold: Option<&mut dyn Fold>,
) -> (Result<Pickle, PickleError>, Counters) {
    parse_folding_from(&mut std::io::Cursor::new(data), data.len(), limits, fold)
}

/// [`parse_folding`] of the `len` bytes `reader` holds from its current
/// position, read twice (the memo scan, then the parse) through a small
/// window, never held whole.
pub fn parse_folding_from<R: Read + Seek>(
    reader: &mut R,
    len: usize,
    limits: &Limits,
    fold: Option<&mut dyn Fold>,
) -> (Result<Pickle, PickleError>, Counters) {
    let refuse = |offset, kind| {
        let err = PickleError {
            offset,
            opcode: None,
            kind,
        };
        (Err(err), Counters::default())
    };
    if len > limits.max_input {
        let max = limits.max_input;
        return refuse(0, PickleErrorKind::TooLarge { len, max });
    }
    let start = match reader.stream_position() {
        Ok(start) => start,
        Err(e) => return refuse(0, PickleErrorKind::Unreadable(e.to_string())),
    };
    let fetched = scan::fetched_memo_entries(&mut Input::new(reader, len));
    if let Err(e) = reader.seek(SeekFrom::Start(start)) {
        return refuse(0, PickleErrorKind::Unreadable(e.to_string()));
    }
    let mut machine = Machine {
        input: Input::new(reader, len),
        limits: *limits,
        pickle: Pickle {
            slots: Vec::new(),
            free: Vec::new(),
            root: Value::None,
        },
        stack: Vec::new(),
        marks: Vec::new(),
        fetched,
        memo: HashMap::new(),
        memo_nodes: HashSet::new(),
        defined: scan::IndexSet::default(),
        memo_count: 0,
        built: 0,
        memory: 0,
        fold,
        spent: Vec::new(),
        folded: 0,
    };
    let result = loop {
        let start = machine.input.position();
        let op = machine
            .input
            .next_byte()
            .and_then(|op| op.ok_or(PickleErrorKind::Truncated));
        let op = match op {
            Ok(op) => op,
            Err(kind) => {
                break Err(PickleError {
                    offset: start,
                    opcode: None,
                    kind,
                });
            }
        };
        match machine.step(op) {
            Ok(Some(root)) => break Ok(root),
            Ok(None) => {}
            Err(kind) => {
                break Err(PickleError {
                    offset: start,
                    opcode: Some(op),
                    kind,
                });
            }
        }
    };
    let counters = Counters {
        values: machine.built,
        bytes: machine.memory,
        folded: machine.folded,
        arena_slots: machine.pickle.slots.len(),
        memo_kept: machine.memo.len(),
        memo_defined: machine.memo_count,
    };
    let result = result.map(|root| Pickle {
        root,
        ..machine.pickle
    });
    (result, counters)
}
