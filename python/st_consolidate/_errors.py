"""The exceptions a consolidation raises, on every rank alike."""


class ConsolidationError(RuntimeError):
    """A consolidation failed (on this rank or another: the message names
    the rank that failed). NeMo's callers catch RuntimeError."""


class InputError(ConsolidationError, ValueError):
    """The inputs or the arguments are unusable: a shard without
    DCP_SHARDING_INFO, a bad header, a mapping that does not fit. A
    ValueError, as the seed documents, and a RuntimeError, as NeMo's
    callers expect."""
