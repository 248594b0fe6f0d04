"""The spool and the pair boundaries it is read back at, without a broker."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sockexec_py.broker.sendqueue import footprint, whole_pairs
from sockexec_py.broker.spool import Spool, SpoolBudget
from sockexec_py.protocol import encode_output_pair

pairs_strategy = st.lists(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=3000)),
    min_size=1,
    max_size=20,
)


def encoded(pairs: list[tuple[str, bytes]]) -> list[bytes]:
    return [b"".join(encode_output_pair(kind, data)) for kind, data in pairs]  # type: ignore[arg-type]


@settings(max_examples=200)
@given(pairs=pairs_strategy, room=st.one_of(st.none(), st.integers(0, 40_000)), cut=st.data())
def test_whole_pairs_never_cuts_a_pair(
    pairs: list[tuple[str, bytes]], room: int | None, cut: st.DataObject
) -> None:
    stream = b"".join(encoded(pairs))
    boundaries = [0]
    for piece in encoded(pairs):
        boundaries.append(boundaries[-1] + len(piece))
    end = cut.draw(st.integers(1, len(stream)))
    size = whole_pairs(memoryview(stream[:end]), room)
    assert size in boundaries
    assert size <= end
    whole = [b for b in boundaries[1:] if b <= end]
    if whole:
        assert size >= whole[0]  # the first whole pair always goes (POLLOUT)
    if room is None:
        assert size == (whole[0] if whole else 0)
    elif size > (whole[0] if whole else 0):
        used = sum(footprint(len(data)) for _, data in pairs[: boundaries.index(size)])
        assert used <= room


def test_spool_appends_reads_back_and_empties(tmp_path: Path) -> None:
    budget = SpoolBudget(str(tmp_path), per_connection=10_000, total=15_000)
    spool = Spool(budget, 1)
    assert spool.append([b"abc", memoryview(b"defg")]) and spool.pending == 7
    assert os.listdir(tmp_path) == []  # the file has no name
    buffer = bytearray(5)
    assert bytes(spool.read_into(buffer)) == b"abcde"
    spool.consume(5)
    assert bytes(spool.read_into(buffer)) == b"fg"
    assert budget.used == 2
    spool.consume(2)
    assert (spool.pending, budget.used) == (0, 0)
    assert not spool.append([b"x" * 10_001])  # over the per-connection cap
    other = Spool(budget, 2)
    assert spool.append([b"x" * 9_000]) and not other.append([b"y" * 7_000])  # total
    assert other.append([b"y" * 6_000]) and budget.used == 15_000
    spool.close()
    other.close()
    assert budget.used == 0


def test_a_failed_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    budget = SpoolBudget(str(tmp_path), per_connection=1 << 20, total=1 << 20)
    spool = Spool(budget, 1)
    assert spool.append([b"first"])
    os.close(spool._fd)  # the next write fails (EBADF), as a full disk would
    spool._fd = os.open(os.devnull, os.O_RDONLY)
    assert not spool.append([b"second"])
    assert spool.failed and spool.pending == 5 and budget.used == 5
    assert not spool.append([b"third"])  # once failed, no more appends
    spool.close()


def test_an_unusable_directory_is_refused(tmp_path: Path) -> None:
    budget = SpoolBudget(str(tmp_path / "missing"), per_connection=100, total=100)
    spool = Spool(budget, 1)
    assert not spool.append([b"data"]) and spool.failed and budget.used == 0
