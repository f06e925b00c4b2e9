//! The interpreter's stack, MARKs and memo, and the arena it builds into,
//! with the memory charged for what it builds.

use super::machine::{Machine, Step, invalid};
use super::{Global, Node, NodeId, Object, PickleErrorKind, Value};

impl Machine<'_, '_> {
    pub(super) fn put(&mut self, index: u64) -> Step<()> {
        let top = self.peek()?;
        let (new, grew) = self.defined.insert(index);
        self.charge(grew)?;
        if new {
            self.memo_count += 1;
            // The entry plus a hash table's overhead, roughly, as if every
            // entry were kept: the cap bounds the work, whatever is kept.
            self.charge(2 * size_of::<(u64, Value)>())?;
        }
        if self.fetched.keeps(index) {
            self.memo.insert(index, top);
            if let Value::Node(id) = top {
                self.memo_nodes.insert(id);
            }
        } else if !new {
            // Stored again and never fetched: the old value is gone.
            self.memo.remove(&index);
        }
        Ok(())
    }

    pub(super) fn get(&mut self, index: u64) -> Step<()> {
        let value = self
            .memo
            .get(&index)
            .copied()
            .ok_or(PickleErrorKind::MissingMemo(index))?;
        self.push(value)
    }

    /// Whether a kept memo entry may name node `id`.
    pub(super) fn memo_refers(&self, id: NodeId) -> bool {
        self.memo_nodes.contains(&id)
    }

    pub(super) fn frame_base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn push(&mut self, value: Value) -> Step<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(PickleErrorKind::StackTooLarge(self.limits.max_stack));
        }
        self.stack.push(value);
        Ok(())
    }

    pub(super) fn push_node(&mut self, node: Node) -> Step<()> {
        let heap = match &node {
            Node::Str(text) => text.len(),
            Node::Bytes(bytes) | Node::BigInt(bytes) => bytes.len(),
            Node::Tuple(items) | Node::List(items) | Node::Set(items) => {
                items.len() * size_of::<Value>()
            }
            Node::Dict(pairs) => pairs.len() * size_of::<(Value, Value)>(),
            Node::Object(_) => size_of::<Object>(),
            Node::Global(_) | Node::PersistentId(_) | Node::Folded(_) | Node::Spent => 0,
        };
        self.charge(size_of::<Node>() + heap)?;
        self.built += 1;
        let Some(id) = self.pickle.insert(node) else {
            return Err(PickleErrorKind::TooMuchMemory(self.limits.max_memory));
        };
        self.push(Value::Node(id))
    }

    /// Pops from the current frame: values below the last MARK are out of reach.
    pub(super) fn pop(&mut self) -> Step<Value> {
        if self.stack.len() <= self.frame_base() {
            return Err(PickleErrorKind::StackUnderflow);
        }
        self.stack.pop().ok_or(PickleErrorKind::StackUnderflow)
    }

    pub(super) fn pop_n(&mut self, count: usize) -> Step<Vec<Value>> {
        if self.stack.len() < self.frame_base() + count {
            return Err(PickleErrorKind::StackUnderflow);
        }
        Ok(self.stack.split_off(self.stack.len() - count))
    }

    pub(super) fn peek(&self) -> Step<Value> {
        if self.stack.len() <= self.frame_base() {
            return Err(PickleErrorKind::StackUnderflow);
        }
        self.stack
            .last()
            .copied()
            .ok_or(PickleErrorKind::StackUnderflow)
    }

    /// Pops everything above the last MARK, and the MARK.
    pub(super) fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let base = self.marks.pop().ok_or(PickleErrorKind::MissingMark)?;
        Ok(self.stack.split_off(base))
    }

    pub(super) fn top_node_mut(&mut self) -> Step<&mut Node> {
        let top = self.peek()?;
        match top {
            Value::Node(id) => self.pickle.get_mut(id).ok_or_else(|| {
                PickleErrorKind::Invalid(
                    "changes a part of another object, used again through the pickle memo".into(),
                )
            }),
            other => invalid(format!("expected a container, found {other:?}")),
        }
    }

    /// Counts `bytes` more of built values against the memory limit.
    pub(super) fn charge(&mut self, bytes: usize) -> Step<()> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > self.limits.max_memory {
            return Err(PickleErrorKind::TooMuchMemory(self.limits.max_memory));
        }
        Ok(())
    }

    pub(super) fn extend_list(&mut self, items: Vec<Value>) -> Step<()> {
        self.charge(items.len() * size_of::<Value>())?;
        match self.top_node_mut()? {
            Node::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => invalid("APPEND on a value that is not a list"),
        }
    }

    pub(super) fn extend_dict(&mut self, new: Vec<(Value, Value)>) -> Step<()> {
        self.charge(new.len() * size_of::<(Value, Value)>())?;
        match self.top_node_mut()? {
            Node::Dict(pairs) => {
                pairs.extend(new);
                Ok(())
            }
            _ => invalid("SETITEM on a value that is not a dict"),
        }
    }

    pub(super) fn node_of(&self, value: Value) -> Option<&Node> {
        match value {
            Value::Node(id) => self.pickle.get(id),
            _ => None,
        }
    }

    pub(super) fn str_of(&self, value: Value) -> Option<&str> {
        match self.node_of(value)? {
            Node::Str(text) => Some(text),
            _ => None,
        }
    }

    pub(super) fn global_of(&self, value: Value) -> Option<Global> {
        match self.node_of(value)? {
            Node::Global(global) => Some(*global),
            _ => None,
        }
    }

    pub(super) fn kind_of(&self, value: Value) -> &'static str {
        match (value, self.node_of(value)) {
            (Value::None, _) => "None",
            (Value::Bool(_), _) => "bool",
            (Value::Int(_), _) => "int",
            (Value::Float(_), _) => "float",
            (Value::Folded(_), _) | (_, Some(Node::Object(_) | Node::Folded(_))) => "object",
            (_, Some(Node::Str(_))) => "str",
            (_, _) => "container",
        }
    }
}
