"""Hypothesis helpers shared by the codec and protocol tests: one stream of bytes
fed whole, one byte at a time, or cut at arbitrary points; and a client session
fed such pieces."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st

from sockexec_py.errors import RemoteProtocolError
from sockexec_py.events import ClientEvent
from sockexec_py.protocol import NEED_DATA, ClientSession


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, 0 < cut < len)."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if a < b]


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split whole, one byte at a time, or at arbitrary points."""
    how = draw(st.sampled_from(["whole", "bytewise", "random"]))
    if how == "whole":
        return [data] if data else []
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=20))
    return split(data, cuts)


def run_client(
    pieces: list[bytes], *, eof: bool = True
) -> tuple[list[ClientEvent], Exception | None]:
    session = ClientSession()
    events: list[ClientEvent] = []
    try:
        for piece in [*pieces, b""] if eof else pieces:
            session.receive_data(piece)
            while (event := session.next_event()) is not NEED_DATA:
                events.append(event)  # type: ignore[arg-type]
    except RemoteProtocolError as error:
        with pytest.raises(RemoteProtocolError) as again:
            session.next_event()
        assert again.value is error
        return events, error
    return events, None
