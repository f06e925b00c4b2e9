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

use super::torch_types::{LAYOUTS, MEMORY_FORMATS, TORCH_DTYPES, TYPED_STORAGES};
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

/// Why a pickle was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickleErrorKind {
    /// The input is larger than the limit.
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ended inside an opcode or before `STOP`.
    Truncated,
    /// A byte that is no pickle opcode.
    UnknownOpcode,
    /// A pickle opcode this reader does not accept (protocol 0/1 text
    /// forms, extension registry, out-of-band buffers).
    UnsupportedOpcode,
    /// A global that is not on the allowlist, as `module.name`.
    ForbiddenGlobal(String),
    /// A pickle protocol newer than 5.
    UnsupportedProtocol(u8),
    /// An opcode needed more values than the stack held.
    StackUnderflow,
    /// An opcode needed a MARK and there was none.
    MissingMark,
    /// Too many values on the stack.
    StackTooLarge(usize),
    /// MARKs nested deeper than the limit.
    TooDeep(usize),
    /// The values built would take more memory than the limit.
    TooMuchMemory(usize),
    /// A memo lookup of an index never stored.
    MissingMemo(u64),
    /// An operand of the wrong type or value.
    Invalid(String),
}

/// A refused pickle: what was wrong and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    /// Byte offset of the opcode in the pickle.
    pub offset: usize,
    /// The opcode byte, if the input reached one.
    pub opcode: Option<u8>,
    /// What went wrong.
    pub kind: PickleErrorKind,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle byte {}", self.offset)?;
        if let Some(op) = self.opcode {
            write!(f, " (opcode {} 0x{op:02x})", opcode_name(op))?;
        }
        f.write_str(": ")?;
        match &self.kind {
            PickleErrorKind::TooLarge { len, max } => {
                write!(f, "{len} bytes is more than the {max} accepted")
            }
            PickleErrorKind::Truncated => f.write_str("the data ends too early (truncated)"),
            PickleErrorKind::UnknownOpcode => f.write_str("not a pickle opcode"),
            PickleErrorKind::UnsupportedOpcode => {
                f.write_str("opcode not used by PyTorch's checkpoints; refused")
            }
            PickleErrorKind::ForbiddenGlobal(name) => write!(
                f,
                "refused global {name}: only PyTorch checkpoint classes, dtypes and tensor \
                 rebuild functions are allowed (loading this pickle in Python would run it)"
            ),
            PickleErrorKind::UnsupportedProtocol(p) => write!(f, "pickle protocol {p} is unknown"),
            PickleErrorKind::StackUnderflow => f.write_str("stack underflow"),
            PickleErrorKind::MissingMark => f.write_str("no MARK to pop"),
            PickleErrorKind::StackTooLarge(max) => write!(f, "more than {max} values on the stack"),
            PickleErrorKind::TooDeep(max) => write!(f, "nested deeper than {max} levels"),
            PickleErrorKind::TooMuchMemory(max) => {
                write!(f, "its values would take more than {max} bytes of memory")
            }
            PickleErrorKind::MissingMemo(index) => write!(f, "memo entry {index} was never stored"),
            PickleErrorKind::Invalid(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for PickleError {}

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

type Step<T> = Result<T, PickleErrorKind>;

fn invalid<T>(reason: impl Into<String>) -> Step<T> {
    Err(PickleErrorKind::Invalid(reason.into()))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    limits: Limits,
    nodes: Vec<Node>,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    /// Memo entries by index, as Python's pickler numbers them.
    memo: Vec<Option<Value>>,
    /// Memo entries stored out of order.
    sparse_memo: HashMap<u64, Value>,
    /// Entries in `memo` and `sparse_memo`.
    memo_count: usize,
    /// Bytes of values built so far, as charged against `max_memory`.
    memory: usize,
}

impl Machine<'_> {
    /// Runs one opcode; returns the root at `STOP`.
    fn step(&mut self, op: u8) -> Step<Option<Value>> {
        match op {
            0x80 => {
                let protocol = self.u8()?;
                if protocol > 5 {
                    return Err(PickleErrorKind::UnsupportedProtocol(protocol));
                }
            }
            // FRAME only announces how many bytes follow; reads are checked anyway.
            0x95 => {
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= self.limits.max_marks {
                    return Err(PickleErrorKind::TooDeep(self.limits.max_marks));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                if self.stack.len() > self.frame_base() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.peek()?;
                self.push(top)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?;
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?;
            }
            0x8a => {
                let len = self.u8()?;
                self.long(len.into())?;
            }
            0x8b => {
                let len = i32::from_le_bytes(self.array()?);
                let Ok(len) = u64::try_from(len) else {
                    return invalid("negative LONG4 length");
                };
                self.long(len)?;
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(Value::Float(v))?;
            }
            // Python 2 strings (SHORT_BINSTRING, BINSTRING) load as str.
            b'U' | 0x8c => {
                let len = self.u8()?;
                self.string(len.into())?;
            }
            b'T' | b'X' => {
                let len = u32::from_le_bytes(self.array()?);
                self.string(len.into())?;
            }
            0x8d => {
                let len = u64::from_le_bytes(self.array()?);
                self.string(len)?;
            }
            b'C' => {
                let len = self.u8()?;
                self.bytes(len.into())?;
            }
            b'B' => {
                let len = u32::from_le_bytes(self.array()?);
                self.bytes(len.into())?;
            }
            0x8e | 0x96 => {
                let len = u64::from_le_bytes(self.array()?);
                self.bytes(len)?;
            }
            b')' => self.push_node(Node::Tuple(Vec::new()))?,
            b']' => self.push_node(Node::List(Vec::new()))?,
            b'}' => self.push_node(Node::Dict(Vec::new()))?,
            0x8f => self.push_node(Node::Set(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_node(Node::Tuple(items))?;
            }
            0x85..=0x87 => {
                let count = usize::from(op - 0x84);
                let items = self.pop_n(count)?;
                self.push_node(Node::Tuple(items))?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_node(Node::List(items))?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.push_node(Node::Dict(pairs))?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push_node(Node::Set(items))?;
            }
            b'a' => {
                let item = self.pop()?;
                self.extend_list(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_dict(vec![(key, value)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_dict(pairs(items)?)?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.charge(items.len() * size_of::<Value>())?;
                match self.top_node_mut()? {
                    Node::Set(set) => set.extend(items),
                    _ => return invalid("ADDITEMS on a value that is not a set"),
                }
            }
            b'q' => {
                let index = self.u8()?;
                self.put(index.into())?;
            }
            b'r' => {
                let index = u32::from_le_bytes(self.array()?);
                self.put(index.into())?;
            }
            0x94 => {
                // Python's len(memo): every entry stored so far.
                let index = self.memo_count as u64;
                self.put(index)?;
            }
            b'h' => {
                let index = self.u8()?;
                self.get(index.into())?;
            }
            b'j' => {
                let index = u32::from_le_bytes(self.array()?);
                self.get(index.into())?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(module), Some(name)) = (self.str_of(module), self.str_of(name)) else {
                    return invalid("STACK_GLOBAL needs two strings");
                };
                let (module, name) = (module.to_owned(), name.to_owned());
                self.global(&module, &name)?;
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                self.call(class, args, None)?;
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let class = self.pop()?;
                if !matches!(self.node_of(kwargs), Some(Node::Dict(_))) {
                    return invalid("NEWOBJ_EX keyword arguments are not a dict");
                }
                self.call(class, args, Some(kwargs))?;
            }
            b'b' => {
                let state = self.pop()?;
                match self.top_node_mut()? {
                    Node::Object(object) if object.state.is_none() => object.state = Some(state),
                    Node::Object(object) => {
                        return invalid(format!("{} object built twice", object.class));
                    }
                    _ => return invalid("BUILD on a value that is not an object"),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push_node(Node::PersistentId(pid))?;
            }
            // Real opcodes PyTorch's binary pickles never contain: protocol 0/1
            // text forms (INT LONG FLOAT STRING UNICODE PERSID GET PUT INST OBJ
            // and LONG_BINPUT's text twin), the extension registry, and
            // out-of-band buffers.
            b'I'
            | b'L'
            | b'F'
            | b'S'
            | b'V'
            | b'P'
            | b'g'
            | b'p'
            | b'i'
            | b'o'
            | 0x82..=0x84
            | 0x97
            | 0x98 => return Err(PickleErrorKind::UnsupportedOpcode),
            _ => return Err(PickleErrorKind::UnknownOpcode),
        }
        Ok(None)
    }

    fn take(&mut self, len: u64) -> Step<&[u8]> {
        let remaining = self.data.len() - self.pos;
        let len = usize::try_from(len).map_err(|_| PickleErrorKind::Truncated)?;
        if len > remaining {
            return Err(PickleErrorKind::Truncated);
        }
        let bytes = &self.data[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let bytes = self.take(N as u64)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// A newline-terminated line (GLOBAL's operands), at most 1 KiB.
    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(1024)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return if rest.len() <= 1024 {
                Err(PickleErrorKind::Truncated)
            } else {
                invalid("GLOBAL name longer than 1024 bytes")
            };
        };
        let text = std::str::from_utf8(&window[..end])
            .map_err(|_| PickleErrorKind::Invalid("GLOBAL name is not UTF-8".into()))?
            .to_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn string(&mut self, len: u64) -> Step<()> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| PickleErrorKind::Invalid("string is not valid UTF-8".into()))?
            .to_owned();
        self.push_node(Node::Str(text))
    }

    fn bytes(&mut self, len: u64) -> Step<()> {
        let bytes = self.take(len)?.to_vec();
        self.push_node(Node::Bytes(bytes))
    }

    /// LONG1/LONG4: little-endian two's complement of `len` bytes.
    fn long(&mut self, len: u64) -> Step<()> {
        let bytes = self.take(len)?;
        if bytes.len() <= 8 {
            let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
            let mut wide = [if negative { 0xff } else { 0 }; 8];
            wide[..bytes.len()].copy_from_slice(bytes);
            self.push(Value::Int(i64::from_le_bytes(wide)))
        } else {
            let bytes = bytes.to_vec();
            self.push_node(Node::BigInt(bytes))
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        match allowed_global(module, name) {
            Some(global) => self.push_node(Node::Global(global)),
            None => Err(PickleErrorKind::ForbiddenGlobal(format!("{module}.{name}"))),
        }
    }

    /// REDUCE / NEWOBJ / NEWOBJ_EX: records the call.
    fn call(&mut self, class: Value, args: Value, kwargs: Option<Value>) -> Step<()> {
        let Some(class) = self.global_of(class) else {
            return invalid(format!(
                "calls a {} instead of an allowed class",
                self.kind_of(class)
            ));
        };
        let Some(Node::Tuple(items)) = self.node_of(args) else {
            return invalid(format!(
                "{class} called with arguments that are not a tuple"
            ));
        };
        let arg_count = items.len();
        // Python pickles an OrderedDict as a call with no arguments followed by
        // SETITEMS, so it becomes a plain (ordered) dict here.
        if class.is("collections", "OrderedDict") && kwargs.is_none() {
            if arg_count != 0 {
                return invalid("collections.OrderedDict called with arguments");
            }
            return self.push_node(Node::Dict(Vec::new()));
        }
        self.push_node(Node::Object(Box::new(Object {
            class,
            args,
            kwargs,
            state: None,
        })))
    }

    fn put(&mut self, index: u64) -> Step<()> {
        let top = self.peek()?;
        let new = match usize::try_from(index) {
            Ok(i) if i < self.memo.len() => self.memo[i].replace(top).is_none(),
            Ok(i) if i == self.memo.len() => {
                self.memo.push(Some(top));
                true
            }
            // Python's pickler numbers memo entries 0, 1, 2, ...; other
            // writers may skip, which must not make the dense table huge.
            _ => self.sparse_memo.insert(index, top).is_none(),
        };
        if new {
            self.memo_count += 1;
            // The entry plus a hash table's overhead, roughly.
            self.charge(2 * size_of::<(u64, Value)>())?;
        }
        Ok(())
    }

    fn get(&mut self, index: u64) -> Step<()> {
        let dense = usize::try_from(index)
            .ok()
            .and_then(|i| self.memo.get(i).copied().flatten());
        let value = dense
            .or_else(|| self.sparse_memo.get(&index).copied())
            .ok_or(PickleErrorKind::MissingMemo(index))?;
        self.push(value)
    }

    fn frame_base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, value: Value) -> Step<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(PickleErrorKind::StackTooLarge(self.limits.max_stack));
        }
        self.stack.push(value);
        Ok(())
    }

    fn push_node(&mut self, node: Node) -> Step<()> {
        let heap = match &node {
            Node::Str(text) => text.len(),
            Node::Bytes(bytes) | Node::BigInt(bytes) => bytes.len(),
            Node::Tuple(items) | Node::List(items) | Node::Set(items) => {
                items.len() * size_of::<Value>()
            }
            Node::Dict(pairs) => pairs.len() * size_of::<(Value, Value)>(),
            Node::Object(_) => size_of::<Object>(),
            Node::Global(_) | Node::PersistentId(_) => 0,
        };
        self.charge(size_of::<Node>() + heap)?;
        self.nodes.push(node);
        self.push(Value::Node(self.nodes.len() - 1))
    }

    /// Pops from the current frame: values below the last MARK are out of reach.
    fn pop(&mut self) -> Step<Value> {
        if self.stack.len() <= self.frame_base() {
            return Err(PickleErrorKind::StackUnderflow);
        }
        self.stack.pop().ok_or(PickleErrorKind::StackUnderflow)
    }

    fn pop_n(&mut self, count: usize) -> Step<Vec<Value>> {
        if self.stack.len() < self.frame_base() + count {
            return Err(PickleErrorKind::StackUnderflow);
        }
        Ok(self.stack.split_off(self.stack.len() - count))
    }

    fn peek(&self) -> Step<Value> {
        if self.stack.len() <= self.frame_base() {
            return Err(PickleErrorKind::StackUnderflow);
        }
        self.stack
            .last()
            .copied()
            .ok_or(PickleErrorKind::StackUnderflow)
    }

    /// Pops everything above the last MARK, and the MARK.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let base = self.marks.pop().ok_or(PickleErrorKind::MissingMark)?;
        Ok(self.stack.split_off(base))
    }

    fn top_node_mut(&mut self) -> Step<&mut Node> {
        let top = self.peek()?;
        match top {
            Value::Node(id) => self
                .nodes
                .get_mut(id)
                .ok_or(PickleErrorKind::StackUnderflow),
            other => invalid(format!("expected a container, found {other:?}")),
        }
    }

    /// Counts `bytes` more of built values against the memory limit.
    fn charge(&mut self, bytes: usize) -> Step<()> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > self.limits.max_memory {
            return Err(PickleErrorKind::TooMuchMemory(self.limits.max_memory));
        }
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Step<()> {
        self.charge(items.len() * size_of::<Value>())?;
        match self.top_node_mut()? {
            Node::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => invalid("APPEND on a value that is not a list"),
        }
    }

    fn extend_dict(&mut self, new: Vec<(Value, Value)>) -> Step<()> {
        self.charge(new.len() * size_of::<(Value, Value)>())?;
        match self.top_node_mut()? {
            Node::Dict(pairs) => {
                pairs.extend(new);
                Ok(())
            }
            _ => invalid("SETITEM on a value that is not a dict"),
        }
    }

    fn node_of(&self, value: Value) -> Option<&Node> {
        match value {
            Value::Node(id) => self.nodes.get(id),
            _ => None,
        }
    }

    fn str_of(&self, value: Value) -> Option<&str> {
        match self.node_of(value)? {
            Node::Str(text) => Some(text),
            _ => None,
        }
    }

    fn global_of(&self, value: Value) -> Option<Global> {
        match self.node_of(value)? {
            Node::Global(global) => Some(*global),
            _ => None,
        }
    }

    fn kind_of(&self, value: Value) -> &'static str {
        match (value, self.node_of(value)) {
            (Value::None, _) => "None",
            (Value::Bool(_), _) => "bool",
            (Value::Int(_), _) => "int",
            (Value::Float(_), _) => "float",
            (_, Some(Node::Object(_))) => "object",
            (_, Some(Node::Str(_))) => "str",
            (_, _) => "container",
        }
    }
}

fn pairs(items: Vec<Value>) -> Step<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return invalid("odd number of items for a dict");
    }
    let mut iter = items.into_iter();
    let mut out = Vec::with_capacity(iter.len() / 2);
    while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
        out.push((key, value));
    }
    Ok(out)
}

/// Modules whose listed names are allowed, besides torch's dtypes, storages,
/// layouts and memory formats (see [`allowed_global`]).
const FIXED_GLOBALS: &[(&str, &[&str])] = &[
    (
        "torch.distributed.checkpoint.metadata",
        &[
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        ],
    ),
    // Where TensorProperties and its enum lived before PyTorch 2.1.
    (
        "torch.distributed._shard.sharded_tensor.metadata",
        &[
            "TensorProperties",
            "MEM_FORMAT_ENCODING",
            "_MEM_FORMAT_ENCODING",
        ],
    ),
    ("torch.distributed.checkpoint.filesystem", &["_StorageInfo"]),
    ("torch", &["Size", "UntypedStorage"]),
    ("torch.storage", &["UntypedStorage"]),
    ("torch.serialization", &["_get_layout"]),
    (
        "torch._utils",
        &["_rebuild_tensor_v2", "_rebuild_tensor_v3"],
    ),
    ("collections", &["OrderedDict"]),
    // StorageMeta.checkpoint_id may be a path; Python 3.13 moved the classes
    // to pathlib._local.
    (
        "pathlib",
        &[
            "Path",
            "PosixPath",
            "WindowsPath",
            "PurePath",
            "PurePosixPath",
            "PureWindowsPath",
        ],
    ),
    (
        "pathlib._local",
        &[
            "Path",
            "PosixPath",
            "WindowsPath",
            "PurePath",
            "PurePosixPath",
            "PureWindowsPath",
        ],
    ),
];

/// The allowlist: `Some` for a global a DCP pickle may name.
pub fn allowed_global(module: &str, name: &str) -> Option<Global> {
    for (allowed_module, names) in FIXED_GLOBALS {
        if *allowed_module != module {
            continue;
        }
        if let Some(allowed) = names.iter().find(|n| **n == name) {
            return Some(Global {
                module: allowed_module,
                name: allowed,
            });
        }
    }
    if module != "torch" {
        return None;
    }
    TORCH_DTYPES
        .iter()
        .map(|(n, _)| *n)
        .chain(TYPED_STORAGES.iter().map(|(n, _)| *n))
        .chain(LAYOUTS.iter().copied())
        .chain(MEMORY_FORMATS.iter().copied())
        .find(|n| *n == name)
        .map(|name| Global {
            module: "torch",
            name,
        })
}

/// Every allowed global, for documentation and tests.
pub fn allowlist() -> Vec<Global> {
    let mut all: Vec<Global> = FIXED_GLOBALS
        .iter()
        .flat_map(|(module, names)| names.iter().map(move |name| Global { module, name }))
        .collect();
    let torch_names = TORCH_DTYPES
        .iter()
        .map(|(n, _)| *n)
        .chain(TYPED_STORAGES.iter().map(|(n, _)| *n))
        .chain(LAYOUTS.iter().copied())
        .chain(MEMORY_FORMATS.iter().copied());
    all.extend(torch_names.map(|name| Global {
        module: "torch",
        name,
    }));
    all
}

/// Pickle opcode names, for messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Pickle, PickleError> {
        parse(bytes, &Limits::METADATA)
    }

    fn kind(bytes: &[u8]) -> PickleErrorKind {
        run(bytes).unwrap_err().kind
    }

    #[test]
    fn os_system_is_refused_by_name_before_it_is_called() {
        // cos\nsystem\n(S'echo hacked'\ntR.  (protocol 0, as exploits are written)
        let err = run(b"cos\nsystem\n(S'echo hacked'\ntR.").unwrap_err();
        assert_eq!(
            err.kind,
            PickleErrorKind::ForbiddenGlobal("os.system".into())
        );
        assert_eq!(err.offset, 0);
        assert!(err.to_string().contains("os.system"), "{err}");
        // The same through STACK_GLOBAL, with protocol 4 framing.
        let mut p4 = vec![0x80, 4, 0x8c, 5];
        p4.extend_from_slice(b"posix");
        p4.extend_from_slice(&[0x8c, 6]);
        p4.extend_from_slice(b"system");
        p4.extend_from_slice(&[0x93, b'.']);
        let err = run(&p4).unwrap_err();
        assert_eq!(
            err.kind,
            PickleErrorKind::ForbiddenGlobal("posix.system".into())
        );
        assert_eq!(err.offset, 17);
        assert_eq!(err.opcode, Some(0x93));
    }

    #[test]
    fn builtins_eval_getattr_and_near_misses_are_refused() {
        for (module, name) in [
            ("builtins", "eval"),
            ("builtins", "getattr"),
            ("torch", "load"),
            ("torch._utils", "_rebuild_parameter"),
            ("torch.distributed.checkpoint.metadata", "os"),
            ("torch.distributed.checkpoint.metadataX", "Metadata"),
            ("collections", "namedtuple"),
        ] {
            let pickle = format!("c{module}\n{name}\n.");
            assert_eq!(
                kind(pickle.as_bytes()),
                PickleErrorKind::ForbiddenGlobal(format!("{module}.{name}"))
            );
        }
    }

    #[test]
    fn truncated_input_is_refused_at_every_cut() {
        let whole: &[u8] = b"\x80\x02]q\x00(K\x01M\x02\x01J\x00\x00\x01\x00X\x02\x00\x00\x00abe.";
        assert!(run(whole).is_ok());
        for cut in 0..whole.len() {
            assert_eq!(
                kind(&whole[..cut]),
                PickleErrorKind::Truncated,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut deep = vec![b'('; 100_000];
        deep.push(b'.');
        assert_eq!(kind(&deep), PickleErrorKind::TooDeep(512));
        let mut wide = vec![b'N'; 200_000];
        wide.push(b'.');
        assert_eq!(kind(&wide), PickleErrorKind::StackTooLarge(1 << 17));
    }

    #[test]
    fn unknown_and_unsupported_opcodes_are_refused() {
        let err = run(b"\xff.").unwrap_err();
        assert_eq!((err.kind, err.offset), (PickleErrorKind::UnknownOpcode, 0));
        assert_eq!(kind(b"I42\n."), PickleErrorKind::UnsupportedOpcode);
        assert_eq!(kind(b"\x80\x05\x97."), PickleErrorKind::UnsupportedOpcode);
        assert_eq!(kind(b"\x80\x06N."), PickleErrorKind::UnsupportedProtocol(6));
        assert!(
            run(b"\x80\x02\xff.")
                .unwrap_err()
                .to_string()
                .contains("0xff")
        );
    }

    #[test]
    fn stack_misuse_is_refused() {
        assert_eq!(kind(b"."), PickleErrorKind::StackUnderflow);
        assert_eq!(kind(b"t."), PickleErrorKind::MissingMark);
        // A MARK hides what is below it.
        assert_eq!(kind(b"](a."), PickleErrorKind::StackUnderflow);
        assert_eq!(kind(b"h\x05."), PickleErrorKind::MissingMemo(5));
        assert_eq!(kind(b"Nq\x00h\x01."), PickleErrorKind::MissingMemo(1));
        assert!(matches!(kind(b"NNa."), PickleErrorKind::Invalid(_)));
        assert!(matches!(kind(b"}(K\x01u."), PickleErrorKind::Invalid(_)));
        // Calling something that is not an allowed global.
        assert!(matches!(kind(b"N)R."), PickleErrorKind::Invalid(_)));
        assert!(matches!(
            kind(b"X\x01\x00\x00\x00\xff."),
            PickleErrorKind::Invalid(_)
        ));
    }

    #[test]
    fn memory_hungry_pickles_are_refused() {
        // One-byte opcodes that each create a node, dropped by POP_MARK so
        // neither the stack nor the nesting caps stop them.
        let limits = Limits {
            max_memory: 1 << 20,
            ..Limits::METADATA
        };
        let mut tuples = vec![b'('];
        tuples.extend(std::iter::repeat_n(b')', 100_000));
        tuples.extend_from_slice(b"1N.");
        assert_eq!(
            parse(&tuples, &limits).unwrap_err().kind,
            PickleErrorKind::TooMuchMemory(1 << 20)
        );
        // A memo entry per two bytes.
        let mut memo = b"N".to_vec();
        memo.extend(std::iter::repeat_n(0x94, 100_000));
        memo.push(b'.');
        assert_eq!(
            parse(&memo, &limits).unwrap_err().kind,
            PickleErrorKind::TooMuchMemory(1 << 20)
        );
        // One-byte values appended to a list.
        let mut list = vec![b']'];
        for _ in 0..1000 {
            list.push(b'(');
            list.extend(std::iter::repeat_n(b'N', 100));
            list.push(b'e');
        }
        list.push(b'.');
        assert_eq!(
            parse(&list, &limits).unwrap_err().kind,
            PickleErrorKind::TooMuchMemory(1 << 20)
        );
        let fine = Limits {
            max_memory: 4 << 20,
            ..limits
        };
        assert!(parse(&list, &fine).is_ok());
    }

    #[test]
    fn input_over_the_limit_is_refused_before_reading() {
        let limits = Limits {
            max_input: 4,
            ..Limits::DATA_PKL
        };
        let err = parse(b"NNNNN.", &limits).unwrap_err();
        assert_eq!(err.kind, PickleErrorKind::TooLarge { len: 6, max: 4 });
    }

    #[test]
    fn containers_scalars_and_memo_build_values() {
        // {'a': [1, -2, 2**40, 1.5, None, True], 'b': ('x', b'y')} with the list memoized
        // and fetched again, as Python's pickler writes it (protocol 2).
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xff\
\x8a\x06\x00\x00\x00\x00\x00\x01G?\xf8\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00b\
X\x01\x00\x00\x00xC\x01y\x86X\x01\x00\x00\x00ch\x02u.";
        let pickle = run(bytes).unwrap();
        let dict = pickle.dict(pickle.root()).unwrap();
        let list = pickle.dict_get(dict, "a").unwrap();
        assert_eq!(
            pickle.sequence(list).unwrap(),
            &[
                Value::Int(1),
                Value::Int(-2),
                Value::Int(1 << 40),
                Value::Float(1.5),
                Value::None,
                Value::Bool(true)
            ]
        );
        let pair = pickle.tuple(pickle.dict_get(dict, "b").unwrap()).unwrap();
        assert_eq!(pickle.str(pair[0]), Some("x"));
        assert_eq!(pickle.node(pair[1]), Some(&Node::Bytes(b"y".to_vec())));
        // BINGET 2 returns the same list, not a copy.
        assert_eq!(pickle.dict_get(dict, "c"), Some(list));
    }

    #[test]
    fn calls_and_builds_are_recorded_not_run() {
        // torch.Size((3, 4)) via REDUCE, then a Metadata via NEWOBJ + BUILD.
        let bytes = b"\x80\x02ctorch\nSize\nK\x03K\x04\x86\x85R\
ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}X\x01\x00\x00\x00kK\x07sb\x86.";
        let pickle = run(bytes).unwrap();
        let items = pickle.tuple(pickle.root()).unwrap();
        let size = pickle.object(items[0]).unwrap();
        assert!(size.class.is("torch", "Size"));
        let dims = pickle.tuple(size.args).unwrap();
        assert_eq!(
            pickle.tuple(dims[0]).unwrap(),
            &[Value::Int(3), Value::Int(4)]
        );
        let metadata = pickle.object(items[1]).unwrap();
        assert_eq!(
            metadata.class.to_string(),
            "torch.distributed.checkpoint.metadata.Metadata"
        );
        let state = pickle.dict(metadata.state.unwrap()).unwrap();
        assert_eq!(pickle.dict_get(state, "k"), Some(Value::Int(7)));
    }

    #[test]
    fn memo_entries_stored_out_of_order_are_found() {
        // BINPUT 7, then MEMOIZE takes index 1 (Python's len(memo)), then
        // LONG_BINPUT far away; all three come back.
        let pickle =
            run(b"K\x0bq\x07K\x16\x94K!r\x00\x00\x01\x00h\x07h\x01j\x00\x00\x01\x00\x87.").unwrap();
        let items = pickle.tuple(pickle.root()).unwrap();
        assert_eq!(items, &[Value::Int(11), Value::Int(22), Value::Int(33)]);
    }

    #[test]
    fn long_integers_keep_their_sign() {
        let pickle = run(b"\x8a\x01\xff.").unwrap();
        assert_eq!(pickle.root(), Value::Int(-1));
        let pickle = run(b"\x8a\x00.").unwrap();
        assert_eq!(pickle.root(), Value::Int(0));
        let pickle = run(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap();
        assert!(matches!(pickle.node(pickle.root()), Some(Node::BigInt(_))));
    }

    #[test]
    fn ordered_dict_becomes_a_dict() {
        let pickle = run(b"ccollections\nOrderedDict\n)R(K\x01K\x02u.").unwrap();
        assert_eq!(
            pickle.dict(pickle.root()).unwrap(),
            &[(Value::Int(1), Value::Int(2))]
        );
    }

    #[test]
    fn allowlist_covers_every_torch_dtype_and_old_class_paths() {
        let all = allowlist();
        assert!(all.iter().any(|g| g.is("torch", "float8_e4m3fn")));
        assert!(all.iter().any(|g| g.is("torch", "BFloat16Storage")));
        assert!(all.iter().any(|g| g.is(
            "torch.distributed._shard.sharded_tensor.metadata",
            "MEM_FORMAT_ENCODING"
        )));
        for global in &all {
            assert_eq!(allowed_global(global.module, global.name), Some(*global));
        }
        assert_eq!(allowed_global("torch", "save"), None);
    }
}
