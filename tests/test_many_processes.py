"""Many processes without hidden waits: a first hub download outlasting the process group's timeout,
one vLLM `generate` call per process, and parts tags hashed without building one huge string."""

from __future__ import annotations

import hashlib
import tracemalloc

from spaceft.rundir import content_hash


def test_content_hash_is_the_repr_digest_without_building_the_repr() -> None:
    """The digest stays the one of the whole `repr` (recorded tags and cache keys remain valid), while
    the largest allocation while hashing is one token list's text, not the whole table's: 2,000 lists of
    500 ids are ~4.5 MB of `repr`; one list is ~2.3 KB."""
    values = [
        ("opponent", 3, {"temperature": 1.0, "top_k": 0}, [tuple(range(i, i + 7)) for i in range(3)]),
        [[1, 2], (3,), ((4,),), [], (), {"a": [1]}, {}],
        ("real", 0, 1, -1),
    ]
    for value in values:
        old = hashlib.sha256(repr(value).encode() + b"\x00").hexdigest()[:16]
        assert content_hash(value) == old
    assert content_hash(*values) == hashlib.sha256(
        b"".join(repr(v).encode() + b"\x00" for v in values)
    ).hexdigest()[:16]

    table = [(("synthetic", i, 0, 0), tuple(range(100)), tuple(range(i, i + 500))) for i in range(2000)]
    assert len(repr(table)) > 4_000_000
    tracemalloc.start()
    content_hash("opponent", table)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100_000
