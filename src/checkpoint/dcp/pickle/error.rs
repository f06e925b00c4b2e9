//! Why a pickle was refused ([`PickleError`]) and how that reads: the
//! offset, the opcode by name, and what was wrong.

use std::fmt;

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
    /// The reader folding the pickle's objects refused one (it says why).
    Refused,
    /// The input could not be read (an I/O error, as text).
    Unreadable(String),
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
            PickleErrorKind::Refused => f.write_str("refused by the reader of its objects"),
            PickleErrorKind::Unreadable(e) => write!(f, "cannot be read: {e}"),
        }
    }
}

impl std::error::Error for PickleError {}

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
