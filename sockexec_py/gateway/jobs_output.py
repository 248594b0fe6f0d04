"""A job's output over HTTP (``GET /v1/jobs/{id}/output``): the raw bytes, or frames
(NDJSON or SSE) of text or base64 with their offsets, read to the end or followed
while the job runs, then the exit frame of a job that finished."""

from __future__ import annotations

import base64
import codecs
from collections.abc import AsyncIterator

from starlette.responses import Response, StreamingResponse

from sockexec_py.jobs import Chunk, Job, Runner
from sockexec_py.jobs.steps import Step

from .jobs_views import exit_frame, job_errors
from .models import OutputQuery
from .streaming import NDJSON, SSE, Emit, Stream

__all__ = ["TextStream", "output_response"]


async def output_response(runner: Runner, job: Job, query: OutputQuery, accept: str) -> Response:
    """The answer for ``job``'s output (or its step's, ``query.step``): raw bytes
    unless ``query.follow`` or ``accept`` asks for frames (SSE only when asked for
    without NDJSON). The job's name was checked against the token's scopes already.

    Error handling: the jobs layer's errors become their HTTP answers
    (:func:`.jobs_views.job_errors`): before the answer starts, or as the last frame
    of a framed answer (a raw answer that started just ends).
    """
    job_id, step = job.id, query.step
    if not (query.follow or NDJSON in accept or SSE in accept):
        with job_errors():
            reader = await runner.read_output(job_id, query.stream, query.offset, step=step)

        async def raw() -> AsyncIterator[bytes]:
            async for item in reader:
                if isinstance(item, Chunk):
                    yield item.data

        return StreamingResponse(
            raw(),
            media_type="application/octet-stream",
            headers={"x-job-state": job.state.value},
        )
    b64 = query.encoding == "base64"
    key = "data_b64" if b64 else "data"

    async def produce(emit: Emit) -> None:
        text = {name: TextStream() for name in ("stdout", "stderr")}
        with job_errors():
            reader = await runner.read_output(
                job_id, query.stream, query.offset, follow=query.follow, step=step
            )
            async for item in reader:
                if not isinstance(item, Chunk):
                    await emit({"type": "truncated"})
                elif b64:
                    data = base64.b64encode(item.data).decode()
                    await emit({"type": item.stream, key: data, "offset": item.offset})
                elif decoded := text[item.stream].decode(item.offset, item.data):
                    await emit({"type": item.stream, key: decoded[1], "offset": decoded[0]})
            for name, stream in text.items():
                if rest := stream.flush():
                    await emit({"type": name, key: rest[1], "offset": rest[0]})
            final: Job | Step = await runner.get(job_id)
            if step is not None:
                final = next(s for s in await runner.steps(job_id) if s.name == step)
        if final.finished:
            await emit(exit_frame(final))

    return Stream(produce, SSE if SSE in accept and NDJSON not in accept else NDJSON)


class TextStream:
    """One stream's output as text: an incremental UTF-8 decoder, so a character cut
    between two chunks comes whole with the later one (invalid bytes become U+FFFD),
    and the offset in the view where the text it gives begins (the held bytes' own,
    in the view of both streams too, where the other stream's chunks come between)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held_at = 0

    def _held(self) -> int:
        return len(self._decoder.getstate()[0])

    def decode(self, offset: int, data: bytes) -> tuple[int, str] | None:
        """(offset, text) of a chunk read at ``offset``; None while it only holds."""
        start = self._held_at if self._held() else offset
        text = self._decoder.decode(data)
        if text:  # what is held now is the tail of this chunk
            self._held_at = offset + len(data) - self._held()
        elif start == offset:
            self._held_at = offset
        return (start, text) if text else None

    def flush(self) -> tuple[int, str] | None:
        """At the end: the bytes still held (a cut character), as U+FFFD."""
        start = self._held_at
        text = self._decoder.decode(b"", final=True)
        return (start, text) if text else None
