//! Unit tests of the pickle reader: refusals (forbidden globals, truncation,
//! limits, stack misuse) and the values built from accepted pickles.

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
