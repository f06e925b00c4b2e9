//! The opcode interpreter: reads one opcode at a time and builds values,
//! refusing what the allowlist and the limits do not admit.

use super::input::Input;
use super::scan::{Fetched, IndexSet};
use super::{Fold, Limits, Node, NodeId, Object, Pickle, PickleErrorKind, Value, allowed_global};
use std::collections::{HashMap, HashSet};

pub(super) type Step<T> = Result<T, PickleErrorKind>;

pub(super) fn invalid<T>(reason: impl Into<String>) -> Step<T> {
    Err(PickleErrorKind::Invalid(reason.into()))
}

pub(super) struct Machine<'a, 'f> {
    pub(super) input: Input<'a>,
    pub(super) limits: Limits,
    /// The arena built so far (its root is set at `STOP`).
    pub(super) pickle: Pickle,
    pub(super) stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    pub(super) marks: Vec<usize>,
    /// The memo entries the pickle fetches (the others are never kept).
    pub(super) fetched: Fetched,
    /// The memo entries kept, by index, as Python's pickler numbers them.
    pub(super) memo: HashMap<u64, Value>,
    /// The nodes kept memo entries name (a folded one must keep its node).
    pub(super) memo_nodes: HashSet<NodeId>,
    /// Every index stored to, kept or not: `MEMOIZE` numbers the next
    /// entry by their count.
    pub(super) defined: IndexSet,
    /// Entries in `defined`.
    pub(super) memo_count: usize,
    /// Nodes built so far (slots are reused, so the arena holds fewer).
    pub(super) built: u64,
    /// Bytes of values built so far, as charged against `max_memory`.
    pub(super) memory: usize,
    /// The reader taking completed objects, if any.
    pub(super) fold: Option<&'f mut dyn Fold>,
    /// The nodes the last fold consumed (reused between folds).
    pub(super) spent: Vec<NodeId>,
    /// Objects folded so far.
    pub(super) folded: u64,
}

impl Machine<'_, '_> {
    /// Runs one opcode; returns the root at `STOP`.
    pub(super) fn step(&mut self, op: u8) -> Step<Option<Value>> {
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
                    // An OrderedDict's attributes: a module's state dict
                    // carries `_metadata` (per-module versions), which no
                    // reader needs.
                    Node::Dict(_) => return Ok(None),
                    _ => return invalid("BUILD on a value that is not an object"),
                }
                self.fold_top()?;
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
        self.input.take(len)
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
        let window = self.input.peek(1025)?;
        let Some(end) = window.iter().take(1024).position(|&b| b == b'\n') else {
            return if window.len() <= 1024 {
                Err(PickleErrorKind::Truncated)
            } else {
                invalid("GLOBAL name longer than 1024 bytes")
            };
        };
        let text = std::str::from_utf8(&window[..end])
            .map_err(|_| PickleErrorKind::Invalid("GLOBAL name is not UTF-8".into()))?
            .to_owned();
        self.input.skip(end as u64 + 1)?;
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
        })))?;
        self.fold_top()
    }

    /// Offers the object on top of the stack to the fold, if there is one:
    /// a taken object becomes `Folded` and its parts are retired.
    fn fold_top(&mut self) -> Step<()> {
        let Some(fold) = self.fold.as_mut() else {
            return Ok(());
        };
        let Some(&Value::Node(id)) = self.stack.last() else {
            return Ok(());
        };
        let Some(Node::Object(object)) = self.pickle.get(id) else {
            return Ok(());
        };
        let object = **object;
        let frame = self.marks.last().copied().unwrap_or(0);
        let below = match self.stack.len().checked_sub(2) {
            Some(at) if at >= frame => Some(self.stack[at]),
            _ => None,
        };
        self.spent.clear();
        let folded = fold
            .fold(&self.pickle, &object, below, &mut self.spent)
            .map_err(|_| PickleErrorKind::Refused)?;
        let Some(folded) = folded else {
            return Ok(());
        };
        self.folded += 1;
        for &part in &self.spent {
            if part != id {
                self.pickle.retire(part);
            }
        }
        if self.memo_refers(id) {
            // A kept memo entry names the node: it stays, as the model's id.
            if let Some(node) = self.pickle.get_mut(id) {
                *node = Node::Folded(folded);
            }
        } else {
            // Only the stack names it: the value carries the id instead.
            self.pickle.retire(id);
            if let Some(top) = self.stack.last_mut() {
                *top = Value::Folded(folded);
            }
        }
        Ok(())
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
