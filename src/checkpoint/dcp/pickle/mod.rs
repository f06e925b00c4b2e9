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

mod allowlist;
mod error;
mod machine;
mod stack;
#[cfg(test)]
mod tests;

pub use allowlist::{allowed_global, allowlist};
pub use error::{PickleError, PickleErrorKind};
use machine::Machine;
use std::collections::HashMap;
use std::fmt;

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

/// Index of a [`Node`] in a [`Pickle`]'s arena.
pub type NodeId = usize;

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
#[derive(Clone, Debug, PartialEq)]
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
}

/// A parsed pickle: the arena and the root value.
#[derive(Clone, Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    root: Value,
}

impl Pickle {
    /// The value `STOP` returned.
    pub fn root(&self) -> Value {
        self.root
    }

    /// The node a value refers to.
    pub fn node(&self, value: Value) -> Option<&Node> {
        match value {
            Value::Node(id) => self.nodes.get(id),
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
                None => "dangling reference".into(),
            },
        }
    }
}

/// Parses a pickle into values, refusing anything outside the allowlist.
pub fn parse(data: &[u8], limits: &Limits) -> Result<Pickle, PickleError> {
    if data.len() > limits.max_input {
        return Err(PickleError {
            offset: 0,
            opcode: None,
            kind: PickleErrorKind::TooLarge {
                len: data.len(),
                max: limits.max_input,
            },
        });
    }
    let mut machine = Machine {
        data,
        pos: 0,
        limits: *limits,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        sparse_memo: HashMap::new(),
        memo_count: 0,
        memory: 0,
    };
    loop {
        let start = machine.pos;
        let Some(&op) = data.get(start) else {
            return Err(PickleError {
                offset: start,
                opcode: None,
                kind: PickleErrorKind::Truncated,
            });
        };
        machine.pos += 1;
        match machine.step(op) {
            Ok(Some(root)) => {
                return Ok(Pickle {
                    nodes: machine.nodes,
                    root,
                });
            }
            Ok(None) => {}
            Err(kind) => {
                return Err(PickleError {
                    offset: start,
                    opcode: Some(op),
                    kind,
                });
            }
        }
    }
}
