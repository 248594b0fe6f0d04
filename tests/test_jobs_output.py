"""The jobs API's text frames (:class:`TextStream`): any split of two interleaved
streams' bytes into chunks gives back each stream's text, and offsets that point at
the bytes each piece of text came from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.gateway.jobs_output import TextStream


@given(
    st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.text(max_size=20))),
    st.data(),
)
def test_any_chunking_of_both_streams_decodes_whole(
    writes: list[tuple[str, str]], data: st.DataObject
) -> None:
    # The view of both streams: each write's bytes, cut anywhere into chunks.
    view = b""
    chunks: list[tuple[str, int, bytes]] = []
    for stream, text in writes:
        raw = text.encode()
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=3)))
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            if end > start:
                chunks.append((stream, len(view) + start, raw[start:end]))
        view += raw
    decoders = {"stdout": TextStream(), "stderr": TextStream()}
    got: dict[str, list[tuple[int, str]]] = {"stdout": [], "stderr": []}
    for stream, offset, raw in chunks:
        if (piece := decoders[stream].decode(offset, raw)) is not None:
            got[stream].append(piece)
    for stream, decoder in decoders.items():
        assert decoder.flush() is None  # every write was whole text
        expected = "".join(text for s, text in writes if s == stream)
        assert "".join(text for _, text in got[stream]) == expected
        for offset, text in got[stream]:
            # The text's first character starts at its offset in the view.
            first = text[0].encode()
            assert view[offset : offset + len(first)] == first


def test_a_cut_character_at_the_end_is_one_replacement() -> None:
    stream = TextStream()
    assert stream.decode(0, "a€".encode()[:3]) == (0, "a")
    assert stream.decode(10, b"") is None
    assert stream.flush() == (1, "\ufffd")
    assert TextStream().decode(0, b"\xff") == (0, "\ufffd")
