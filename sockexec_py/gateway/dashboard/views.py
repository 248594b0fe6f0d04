"""The dashboard's pages as HTML, from the jobs layer's records and the API's views.

Every function returns :class:`~.html.Markup` built by :func:`~.html.render` or
:func:`~.html.tag`, so every value from a job (argv, name, labels, reason, progress
titles) is escaped on its way in. Output is never put in a page: the script fetches
it and inserts it as text.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sockexec_py._version import __version__
from sockexec_py.jobs import Job, JobState, Progress

from .html import Markup, escape, join, render, tag

#: Pages the list offers (the API allows 1-1000).
PAGE_SIZES = (50, 100, 500, 1000)
#: Bytes of output the job page starts with (the rest: the download links).
TAIL_BYTES = 1 << 20
#: Characters of a command shown in the list.
ARGV_CHARS = 200
_NAV = (("/", "Jobs", "jobs"), ("/run", "Run", "run"), ("/queue", "Queues", "queue"))


def when(stamp: float | None) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(stamp: float | None) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def seconds(value: float | None) -> str:
    """A duration for people: ``0.42 s``, ``12 s``, ``3 min 4 s``, ``2 h 5 min``."""
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s"
    whole = int(value)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def command_line(argv: Sequence[str], limit: int | None = None) -> str:
    text = shlex.join(argv)
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def fraction(progress: Progress, state: JobState) -> float | None:
    """How far a job got, 0 to 1 (``None``: it said nothing a bar could show).
    ``[n/m]`` means task n of m is under way, so n-1 of them are done; a job that
    succeeded after saying anything is done."""
    said = progress.tasks is not None or progress.percent is not None
    if state is JobState.SUCCEEDED and said:
        return 1.0
    if progress.tasks:
        done = (progress.task or 1) - 1 + (progress.percent or 0) / 100
        return max(0.0, min(1.0, done / progress.tasks))
    if progress.percent is not None:
        return progress.percent / 100
    return None


def progress_text(progress: Progress) -> str:
    parts = []
    if progress.task is not None:
        parts.append(f"{progress.task}/{progress.tasks}" if progress.tasks else f"#{progress.task}")
    if progress.title:
        parts.append(progress.title)
    if progress.percent is not None:
        parts.append(f"{progress.percent}%" + (f" {progress.step}" if progress.step else ""))
    return " · ".join(parts)


def progress_bar(progress: Progress, state: JobState) -> Markup:
    done = fraction(progress, state)
    text = progress_text(progress)
    if done is None and not text:
        return Markup("")
    bar = tag("progress", "", max="1000", value=None if done is None else str(round(done * 1000)))
    return Markup(bar + " " + tag("span", text, class_="progress-text"))


def duration_of(job: Job, now: float) -> float | None:
    if job.duration is not None:
        return job.duration
    if job.state is JobState.RUNNING and job.started_at is not None:
        return max(0.0, now - job.started_at)
    return None


def layout(
    page: str, title: str, content: Markup, csrf: str, *, logout: bool, status_page: bool = False
) -> Markup:
    nav = join(
        tag("a", label, href=href, aria_current="page" if key == page else None)
        for href, label, key in _NAV
    )
    logout_form = Markup("")
    if logout:
        logout_form = Markup(
            '<form class="logout" method="post" action="/logout">'
            + tag("input", type="hidden", name="csrf", value=csrf)
            + '<button type="submit" id="logout">Log out</button></form>'
        )
    return render(
        "layout.html",
        {
            "csrf": csrf,
            "title": title,
            "version": __version__,
            "page": page,
            "nav": Markup("") if status_page else nav,
            "logout": logout_form,
            "content": content,
        },
    )


def job_row(job: Job | None, now: float) -> Markup:
    """One row of the list; ``None``: the blank row the script fills for new jobs."""
    if job is None:
        values: dict[str, object] = dict.fromkeys(
            ("id", "state", "started_epoch", "url", "name", "argv", "started_iso", "started"), ""
        )
        values.update(duration="", progress="")
        return render("row.html", values)
    return render(
        "row.html",
        {
            "id": job.id,
            "state": job.state.value,
            "started_epoch": "" if job.started_at is None else f"{job.started_at:.3f}",
            "url": f"/jobs/{job.id}",
            "name": job.name,
            "argv": command_line(job.argv, ARGV_CHARS),
            "started_iso": iso(job.started_at),
            "started": when(job.started_at),
            "duration": seconds(duration_of(job, now)),
            "progress": progress_bar(job.progress, job.state),
        },
    )


def totals_line(totals: Mapping[str, int]) -> Markup:
    return join(
        (
            tag(
                "span",
                Markup(escape(state) + " " + tag("strong", f"{count:,}")),
                class_=f"total state-{state}",
                data_state=state,
            )
            for state, count in totals.items()
        ),
        " ",
    )


def options(values: Sequence[tuple[str, str]], selected: str) -> Markup:
    return join(
        tag("option", label, value=value, selected=value == selected) for value, label in values
    )


def jobs_page(
    jobs: Sequence[Job],
    totals: Mapping[str, int],
    *,
    state: str,
    name: str,
    limit: int,
    cursor: str | None,
    next_cursor: str | None,
    notice: str = "",
) -> Markup:
    now = time.time()
    filters = {k: v for k, v in (("state", state), ("name", name)) if v}
    if limit != PAGE_SIZES[0]:
        filters["limit"] = str(limit)
    pager = []
    if cursor is not None:
        pager.append(tag("a", "« Newest", href="/?" + urlencode(filters), id="first-page"))
    if next_cursor is not None:
        query = urlencode({**filters, "cursor": next_cursor})
        pager.append(tag("a", "Older »", href=f"/?{query}", id="next-page", rel="next"))
    if not jobs:
        notice = notice or "No jobs match."
    return render(
        "jobs.html",
        {
            "live": "first" if cursor is None else "rows",
            "state": state,
            "name": name,
            "limit": str(limit),
            "totals": totals_line(totals),
            "state_options": options([("", "any"), *((s.value, s.value) for s in JobState)], state),
            "limit_options": options([(str(n), str(n)) for n in PAGE_SIZES], str(limit)),
            "notice": tag("p", notice, class_="notice") if notice else "",
            "rows": join(job_row(job, now) for job in jobs),
            "pager": join(pager, " "),
            "blank_row": job_row(None, now),
        },
    )


def _exit(view: Mapping[str, Any]) -> str:
    if view["termsig"]:
        return f"signal {view['termsig']}"
    if view["exitcode"] is not None:
        return f"exit code {view['exitcode']}"
    return ""


def steps_table(steps: object, job_id: str = "") -> Markup:
    """The steps of a multi-step task (issue 16), when the job view has them, each
    with a link to its output."""
    if not isinstance(steps, list) or not steps:
        return Markup("")
    columns = ("name", "state", "exitcode", "termsig", "duration", "reason")
    rows = []
    for number, step in enumerate(steps, 1):
        if not isinstance(step, Mapping):
            continue
        cells = [tag("td", str(number))]
        for column in columns:
            value = step.get(column)
            if column == "state" and value:
                cells.append(tag("td", tag("span", value, class_=f"badge state-{value}")))
            elif column == "duration":
                took = float(value) if isinstance(value, int | float) else None
                cells.append(tag("td", seconds(took)))
            else:
                cells.append(tag("td", "" if value is None else value))
        query = urlencode({"step": str(step.get("name", ""))})
        cells.append(tag("td", tag("a", "output", href=f"/jobs/{job_id}/output?{query}")))
        rows.append(tag("tr", join(cells), class_="step"))
    head = join(tag("th", c) for c in ("#", *columns, ""))
    return Markup(
        tag("h2", "Steps")
        + tag("table", Markup(tag("thead", tag("tr", head)) + tag("tbody", join(rows))), id="steps")
    )


def job_page(job: Job, view: Mapping[str, Any], *, can_cancel: bool) -> Markup:
    now = time.time()
    size = job.stdout_bytes + job.stderr_bytes
    offset = max(0, size - TAIL_BYTES)
    note = (
        f"The first {offset:,} bytes are not shown here."
        if offset
        else "Lines appear as they come."
    )
    cancel = Markup("")
    if can_cancel and not job.finished:
        cancel = tag(
            "button",
            "Cancel job",
            type="button",
            id="cancel",
            class_="danger",
            data_confirm=f"Cancel job {job.name} ({job.id})? A running program is terminated.",
        )
    labels = join((tag("span", f"{k}={v}", class_="label") for k, v in job.labels.items()), " ")
    sizes = f"{job.stdout_bytes:,} bytes stdout, {job.stderr_bytes:,} bytes stderr"
    if job.truncated:
        sizes += f"; truncated, {job.dropped_bytes:,} bytes dropped"
    base = f"/jobs/{job.id}/output"
    return render(
        "job.html",
        {
            "id": job.id,
            "state": job.state.value,
            "finished": "true" if job.finished else "false",
            "offset": str(offset),
            "started_epoch": "" if job.started_at is None else f"{job.started_at:.3f}",
            "name": job.name,
            "argv": (
                f"a {job.mode} task of {job.steps} steps (below)"
                if job.is_task
                else command_line(job.argv)
            ),
            "labels": labels,
            "created": when(job.created_at),
            "start_at": when(job.start_at),
            "started": when(job.started_at),
            "ended": when(job.ended_at),
            "duration": seconds(duration_of(job, now)),
            "exit": _exit(view),
            "reason": job.reason,
            "position": "" if view.get("position") is None else view["position"],
            "sizes": sizes,
            "progress": progress_bar(job.progress, job.state),
            "cancel": cancel,
            "steps": steps_table(view.get("steps"), job.id),
            "output_note": note,
            "download": base,
            "download_stdout": f"{base}?stream=stdout",
            "download_stderr": f"{base}?stream=stderr",
        },
    )


def queue_page(
    rows: Sequence[tuple[str, int, int, int]],
    *,
    running: int,
    max_running: int,
    default_limit: int,
    notice: str = "",
) -> Markup:
    """Per name: (name, running, limit, waiting)."""
    body = join(
        tag(
            "tr",
            join(
                [
                    tag("td", tag("a", name, href="/?" + urlencode({"name": name}))),
                    tag("td", f"{count} / {limit}", class_="running"),
                    tag("td", str(waiting), class_="waiting"),
                ]
            ),
            data_name=name,
        )
        for name, count, limit, waiting in rows
    )
    if not rows:
        notice = notice or "Nothing runs or waits."
    return render(
        "queue.html",
        {
            "live": "true",
            "running": str(running),
            "max_running": str(max_running),
            "default_limit": str(default_limit),
            "notice": tag("p", notice, class_="notice") if notice else "",
            "rows": body,
        },
    )


def error_page(title: str, detail: str) -> Markup:
    return render("error.html", {"title": title, "detail": detail})
