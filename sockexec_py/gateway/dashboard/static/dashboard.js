// sockexec dashboard: live rows, live output, the run form's checks, cancel.
//
// Safety rules of this file: text from jobs (argv, names, labels, output) only ever
// reaches the page through textContent, attribute values or class names built from
// known words; nothing is parsed as HTML (no innerHTML, no insertAdjacentHTML).
// The page's CSP allows this file and nothing inline.
"use strict";

(function () {
  const STATES = ["scheduled", "queued", "running", "succeeded", "failed", "cancelled", "lost"];
  const FINISHED = new Set(["succeeded", "failed", "cancelled", "lost"]);
  // The output pane keeps at most this many lines (and chars per line) in the DOM;
  // the full output is a download away.
  const MAX_LINES = 2000;
  const MAX_LINE_CHARS = 4000;
  const MAX_SPANS_PER_LINE = 200;
  const FRAME_LINES = 250;

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function el(name, className, text) {
    const node = document.createElement(name);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // ---- formatting: the same as views.py's ---------------------------------------

  function pad(n) { return String(n).padStart(2, "0"); }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d)) return "";
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
      `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`;
  }

  function seconds(value) {
    if (value === null || value === undefined || isNaN(value)) return "";
    if (value < 10) return `${value.toFixed(2)} s`;
    const whole = Math.floor(value);
    if (whole < 60) return `${whole} s`;
    if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
    return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
  }

  function duration(job) {
    if (job.duration !== null && job.duration !== undefined) return seconds(job.duration);
    if (job.state === "running" && job.started_at) {
      return seconds(Math.max(0, Date.now() / 1000 - Date.parse(job.started_at) / 1000));
    }
    return "";
  }

  function quote(arg) {  // shlex.quote
    if (arg === "") return "''";
    if (/^[\w@%+=:,./-]+$/.test(arg)) return arg;
    return "'" + arg.replace(/'/g, "'\"'\"'") + "'";
  }

  function commandLine(argv, limit) {
    const text = argv.map(quote).join(" ");
    return limit && text.length > limit ? text.slice(0, limit - 1) + "…" : text;
  }

  function fraction(progress, state) {
    const said = progress.tasks !== null || progress.percent !== null;
    if (state === "succeeded" && said) return 1;
    if (progress.tasks) {
      const done = (progress.task || 1) - 1 + (progress.percent || 0) / 100;
      return Math.max(0, Math.min(1, done / progress.tasks));
    }
    if (progress.percent !== null) return progress.percent / 100;
    return null;
  }

  function progressText(progress) {
    const parts = [];
    if (progress.task !== null) {
      parts.push(progress.tasks ? `${progress.task}/${progress.tasks}` : `#${progress.task}`);
    }
    if (progress.title) parts.push(progress.title);
    if (progress.percent !== null) {
      parts.push(`${progress.percent}%` + (progress.step ? ` ${progress.step}` : ""));
    }
    return parts.join(" · ");
  }

  function showProgress(cell, progress, state) {
    const done = fraction(progress, state);
    const text = progressText(progress);
    if (done === null && !text) { cell.replaceChildren(); return; }
    let bar = cell.querySelector("progress");
    let label = cell.querySelector(".progress-text");
    if (!bar || !label) {
      bar = el("progress");
      bar.max = 1000;
      label = el("span", "progress-text");
      cell.replaceChildren(bar, document.createTextNode(" "), label);
    }
    if (done === null) bar.removeAttribute("value");
    else bar.value = Math.round(done * 1000);
    label.textContent = text;
  }

  function badge(node, state) {
    node.textContent = state;
    node.className = "badge state-" + (STATES.includes(state) ? state : "unknown");
  }

  // ---- live feed (SSE from /ui/events; issue 16's monitor can replace it) --------

  function follow(url, handlers) {
    const source = new EventSource(url);
    let broken = false;
    for (const [name, handler] of Object.entries(handlers)) {
      if (name === "open" || name === "broken") continue;
      source.addEventListener(name, (event) => {
        if (event.data !== undefined) handler(JSON.parse(event.data));
      });
    }
    source.addEventListener("open", () => {
      if (broken && handlers.open) handlers.open();  // back after a break: resync
      broken = false;
    });
    source.addEventListener("error", (event) => {
      if (event.data) return;  // an error frame of ours, not the connection's
      broken = true;
      if (source.readyState === EventSource.CLOSED && handlers.broken) handlers.broken();
    });
    return source;
  }

  // ---- the jobs list ----------------------------------------------------------------

  function initJobs(section) {
    const rows = document.getElementById("job-rows");
    const template = document.getElementById("job-row");
    const filterState = section.dataset.state;
    const filterName = section.dataset.name;
    const limit = Number(section.dataset.limit) || 50;
    const firstPage = section.dataset.live === "first";

    function fill(tr, job) {
      tr.dataset.id = job.id;
      tr.dataset.state = job.state;
      tr.dataset.started = job.started_at ? String(Date.parse(job.started_at) / 1000) : "";
      badge(tr.querySelector(".state .badge"), job.state);
      const link = tr.querySelector(".name a");
      link.textContent = job.name;
      link.href = "/jobs/" + encodeURIComponent(job.id);
      tr.querySelector(".argv code").textContent = commandLine(job.argv, 200);
      const time = tr.querySelector(".started time");
      time.dateTime = job.started_at || "";
      time.textContent = when(job.started_at);
      tr.querySelector(".duration").textContent = duration(job);
      showProgress(tr.querySelector(".progress"), job.progress, job.state);
    }

    function rowOf(id) {
      for (const tr of rows.children) if (tr.dataset.id === id) return tr;
      return null;
    }

    function newRow(job) {
      const tr = template.content.firstElementChild.cloneNode(true);
      fill(tr, job);
      return tr;
    }

    function matches(job) {
      return (!filterState || job.state === filterState) && (!filterName || job.name === filterName);
    }

    function onJob(frame) {
      const job = frame.job;
      const tr = rowOf(job.id);
      if (tr) { fill(tr, job); return; }
      if (!firstPage || !matches(job)) return;
      // A job newer than the first row goes on top (ids sort by creation time).
      const top = rows.firstElementChild;
      if (top && top.dataset.id > job.id) return;
      const fresh = newRow(job);
      fresh.classList.add("fresh");
      rows.prepend(fresh);
      while (rows.children.length > limit) rows.lastElementChild.remove();
      const notice = section.querySelector(".notice");
      if (notice) notice.remove();
    }

    function onTotals(frame) {
      for (const [state, count] of Object.entries(frame.totals)) {
        const strong = document.querySelector(`#totals [data-state="${state}"] strong`);
        if (strong) strong.textContent = Number(count).toLocaleString("en");
      }
    }

    // After a break (or when a client fell behind): read the page again through the
    // API, with the session and its CSRF token.
    async function resync() {
      const params = new URLSearchParams(location.search);
      const query = new URLSearchParams();
      for (const key of ["state", "name", "cursor"]) if (params.get(key)) query.set(key, params.get(key));
      query.set("limit", String(limit));
      const answer = await fetch("/v1/jobs?" + query, {
        headers: { "X-CSRF-Token": csrfToken(), "Accept": "application/json" },
        credentials: "same-origin",
      });
      if (!answer.ok) return;
      const page = await answer.json();
      rows.replaceChildren(...page.jobs.map(newRow));
      onTotals({ totals: page.totals });
    }

    setInterval(() => {
      for (const tr of rows.querySelectorAll('tr[data-state="running"]')) {
        const started = Number(tr.dataset.started);
        if (started) tr.querySelector(".duration").textContent = seconds(Date.now() / 1000 - started);
      }
    }, 1000);

    follow("/ui/events", {
      job: onJob,
      totals: onTotals,
      resync: () => { resync(); },
      open: () => { resync(); },
    });
  }

  // ---- output: ANSI colours as classes, bounded DOM ----------------------------------

  const ESCAPES = /\x1b(?:\[([0-9;:?<=>]*)[ -\/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[P^_][^\x1b]*\x1b\\|[@-Z\\-_])|\r\n?|\n|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g;
  // An escape sequence cut at the end of a chunk: kept for the next one.
  const PARTIAL = /\x1b(?:\[[0-9;:?<=>]*[ -\/]*|\][^\x07\x1b]*\x1b?|[P^_][^\x1b]*\x1b?)?$|\r$/;

  class OutputView {
    constructor(pre, status) {
      this.pre = pre;
      this.status = status;
      this.line = null;
      this.lineChars = 0;
      this.lineSpans = 0;
      this.style = OutputView.plain();
      this.carry = { stdout: "", stderr: "" };
      this.pending = [];
      this.pendingLines = 0;
      this.hiddenLines = 0;
      this.scheduled = false;
    }

    static plain() { return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false }; }

    write(text, kind) {
      const lines = countLines(text);
      this.pending.push({ text, kind, lines });
      this.pendingLines += lines;
      this.schedule();
    }

    schedule() {
      if (this.scheduled) return;
      this.scheduled = true;
      const run = () => { this.scheduled = false; this.flush(); };
      if (document.visibilityState === "visible") requestAnimationFrame(run);
      else setTimeout(run, 250);
    }

    // Only the last MAX_LINES lines of what waits can stay in the DOM: the rest is
    // skipped without being rendered, so 10 MiB of output costs one frame's work.
    flush() {
      while (this.pendingLines > MAX_LINES && this.pending.length > 1 &&
             this.pendingLines - this.pending[0].lines >= MAX_LINES) {
        const dropped = this.pending.shift();
        this.pendingLines -= dropped.lines;
        this.hide(dropped.lines);
      }
      if (this.pendingLines > MAX_LINES && this.pending.length) {
        const head = this.pending[0];
        const excess = this.pendingLines - MAX_LINES;
        let cut = 0;
        for (let i = 0; i < excess; i++) cut = head.text.indexOf("\n", cut) + 1;
        head.text = head.text.slice(cut);
        head.lines -= excess;
        this.pendingLines -= excess;
        this.hide(excess);
      }
      const follow = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 24;
      // At most FRAME_LINES lines a frame: the rest waits for the next one, so the
      // page answers between two batches.
      let budget = FRAME_LINES;
      while (this.pending.length && budget > 0) {
        const item = this.pending[0];
        if (item.lines <= budget) {
          this.pending.shift();
          this.pendingLines -= item.lines;
          budget -= item.lines;
          this.render(item.text, item.kind);
          continue;
        }
        let cut = 0;
        for (let i = 0; i < budget; i++) cut = item.text.indexOf("\n", cut) + 1;
        this.render(item.text.slice(0, cut), item.kind);
        item.text = item.text.slice(cut);
        item.lines -= budget;
        this.pendingLines -= budget;
        budget = 0;
      }
      while (this.pre.childElementCount > MAX_LINES) {
        this.pre.firstElementChild.remove();
        this.hiddenLines += 1;
      }
      this.showHidden();
      if (follow) this.pre.scrollTop = this.pre.scrollHeight;
      if (this.pending.length) this.schedule();
    }

    hide(lines) {
      this.hiddenLines += lines;
      this.newLine();  // what was cut off did not end the current line's text
      this.style = OutputView.plain();
    }

    showHidden() {
      if (this.hiddenLines) {
        this.status.textContent = `${this.hiddenLines.toLocaleString("en")} earlier lines are ` +
          "not shown here: download the full output.";
      }
    }

    render(chunk, kind) {
      let text = this.carry[kind] + chunk;
      const partial = PARTIAL.exec(text);
      this.carry[kind] = partial ? partial[0] : "";
      if (partial) text = text.slice(0, partial.index);
      let last = 0;
      ESCAPES.lastIndex = 0;
      for (let match; (match = ESCAPES.exec(text)) !== null;) {
        if (match.index > last) this.append(text.slice(last, match.index), kind);
        last = ESCAPES.lastIndex;
        const seq = match[0];
        if (seq === "\n" || seq === "\r\n") this.newLine();
        else if (seq === "\r") this.clearLine();
        else if (match[2] === "m") this.sgr(match[1]);
      }
      if (last < text.length) this.append(text.slice(last), kind);
    }

    newLine() {
      this.line = null;
    }

    clearLine() {  // a carriage return: the line is drawn again (progress bars)
      if (this.line) this.line.replaceChildren();
      this.lineChars = 0;
      this.lineSpans = 0;
    }

    classes(kind) {
      const s = this.style;
      const names = [];
      if (kind === "stderr") names.push("stderr");
      if (s.fg !== null) names.push("ansi-fg-" + s.fg);
      if (s.bg !== null) names.push("ansi-bg-" + s.bg);
      if (s.bold) names.push("ansi-bold");
      if (s.dim) names.push("ansi-dim");
      if (s.italic) names.push("ansi-italic");
      if (s.underline) names.push("ansi-underline");
      return names.join(" ");
    }

    append(text, kind) {
      if (!this.line) {
        this.line = el("div", "line");
        this.pre.append(this.line);
        this.lineChars = 0;
        this.lineSpans = 0;
      }
      if (this.lineChars >= MAX_LINE_CHARS) return;
      if (this.lineChars + text.length > MAX_LINE_CHARS) {
        text = text.slice(0, MAX_LINE_CHARS - this.lineChars) + " … (line cut here)";
      }
      this.lineChars += text.length;
      const className = this.classes(kind);
      const tail = this.line.lastChild;
      if (tail && (tail.className === className || this.lineSpans >= MAX_SPANS_PER_LINE)) {
        tail.textContent += text;
        return;
      }
      this.line.append(el("span", className, text));
      this.lineSpans += 1;
    }

    sgr(params) {
      const codes = params === "" ? [0] : params.split(/[;:]/).map(Number);
      const s = this.style;
      for (let i = 0; i < codes.length; i++) {
        const c = codes[i];
        if (c === 0) Object.assign(s, OutputView.plain());
        else if (c === 1) s.bold = true;
        else if (c === 2) s.dim = true;
        else if (c === 3) s.italic = true;
        else if (c === 4) s.underline = true;
        else if (c === 22) { s.bold = false; s.dim = false; }
        else if (c === 23) s.italic = false;
        else if (c === 24) s.underline = false;
        else if (c >= 30 && c <= 37) s.fg = c - 30;
        else if (c >= 90 && c <= 97) s.fg = c - 90 + 8;
        else if (c === 39) s.fg = null;
        else if (c >= 40 && c <= 47) s.bg = c - 40;
        else if (c >= 100 && c <= 107) s.bg = c - 100;
        else if (c === 49) s.bg = null;
        else if (c === 38 || c === 48) {  // 256 colours (the first 16 kept) or RGB: dropped
          if (codes[i + 1] === 5) {
            const n = codes[i + 2];
            if (n < 16) { if (c === 38) s.fg = n; else s.bg = n % 8; }
            i += 2;
          } else if (codes[i + 1] === 2) {
            i += 4;
          }
        }
      }
    }
  }

  function countLines(text) {
    let n = 0;
    for (let i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", i + 1)) n++;
    return n;
  }

  function base64Bytes(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // ---- a job's page -------------------------------------------------------------------

  function initJob(section) {
    const id = section.dataset.id;
    const status = document.getElementById("output-status");
    const hiddenNote = el("span", "hidden-note");
    const endNote = el("span", "end-note");
    status.append(hiddenNote, " ", endNote);
    const view = new OutputView(document.getElementById("output"), hiddenNote);
    const decoders = { stdout: new TextDecoder("utf-8"), stderr: new TextDecoder("utf-8") };
    let offset = Number(section.dataset.outputOffset) || 0;
    let state = section.dataset.state;
    let output = null;
    let events = null;

    function set(idName, text) {
      const node = document.getElementById(idName);
      if (node) node.textContent = text;
    }

    function showJob(job) {
      state = job.state;
      section.dataset.state = job.state;
      badge(document.getElementById("job-state"), job.state);
      set("job-started", when(job.started_at));
      set("job-ended", when(job.ended_at));
      set("job-duration", duration(job));
      set("job-exit", job.termsig ? `signal ${job.termsig}` :
        job.exitcode !== null ? `exit code ${job.exitcode}` : "");
      set("job-reason", job.reason || "");
      set("job-position", job.position === null || job.position === undefined ? "" : job.position);
      let sizes = `${job.stdout_bytes.toLocaleString("en")} bytes stdout, ` +
        `${job.stderr_bytes.toLocaleString("en")} bytes stderr`;
      if (job.truncated) sizes += `; truncated, ${job.dropped_bytes.toLocaleString("en")} bytes dropped`;
      set("job-sizes", sizes);
      showProgress(document.getElementById("job-progress"), job.progress, job.state);
      if (job.steps) showSteps(job.steps);
      if (FINISHED.has(job.state)) {
        const cancel = document.getElementById("cancel");
        if (cancel) cancel.remove();
        if (events) { events.close(); events = null; }
      } else if (job.state === "running" && !output) {
        openOutput();
      }
    }

    // A task's steps, in the order of the table the server rendered: # name state
    // exitcode termsig duration reason.
    function showSteps(steps) {
      const rows = document.querySelectorAll("#steps tbody tr.step");
      steps.forEach((step, i) => {
        const cells = rows[i] ? rows[i].children : null;
        if (!cells || cells[1].textContent !== step.name) return;
        badge(cells[2].firstElementChild || cells[2].appendChild(el("span")), step.state);
        cells[3].textContent = step.exitcode === null ? "" : step.exitcode;
        cells[4].textContent = step.termsig || "";
        cells[5].textContent = seconds(step.duration);
        cells[6].textContent = step.reason || "";
      });
    }

    function openOutput() {
      if (output) return;
      output = follow(`/ui/jobs/${encodeURIComponent(id)}/live?offset=${offset}`, {
        stdout: (frame) => chunk(frame, "stdout"),
        stderr: (frame) => chunk(frame, "stderr"),
        truncated: () => { view.write("\n… output truncated at the gateway's cap\n", "stderr"); },
        exit: (frame) => {
          output.close();
          view.write(decoders.stdout.decode() + decoders.stderr.decode(), "stdout");
          endNote.textContent = `Output complete: ${frame.state}.`;
        },
        error: (frame) => { endNote.textContent = frame.detail; output.close(); },
        broken: () => {  // closed for good (e.g. the session ended): try again later
          output = null;
          if (!FINISHED.has(state)) setTimeout(openOutput, 2000);
        },
      });
      output.addEventListener("error", () => {
        // EventSource reconnects to the same URL: from the start offset. Reopen
        // from where we are instead.
        if (output && output.readyState === EventSource.CONNECTING) {
          output.close();
          output = null;
          setTimeout(openOutput, 1000);
        }
      });
    }

    function chunk(frame, kind) {
      const bytes = base64Bytes(frame.data_b64);
      offset = frame.offset + bytes.length;
      view.write(decoders[kind].decode(bytes, { stream: true }), kind);
    }

    const cancel = document.getElementById("cancel");
    if (cancel) {
      cancel.addEventListener("click", async () => {
        if (!window.confirm(cancel.dataset.confirm)) return;
        cancel.disabled = true;
        cancel.textContent = "Cancelling…";
        const answer = await fetch(`/v1/jobs/${encodeURIComponent(id)}/cancel`, {
          method: "POST",
          headers: { "X-CSRF-Token": csrfToken(), "Accept": "application/json" },
          credentials: "same-origin",
        });
        const body = await answer.json().catch(() => ({}));
        if (answer.ok) showJob(body);
        else {
          cancel.disabled = false;
          cancel.textContent = "Cancel job";
          endNote.textContent = `Cancel refused: ${body.detail || answer.status}`;
        }
      });
    }

    if (state !== "scheduled" && state !== "queued") openOutput();
    if (!FINISHED.has(state)) {
      events = follow(`/ui/events?job=${encodeURIComponent(id)}`, { job: (frame) => showJob(frame.job) });
    }
    setInterval(() => {
      const started = Number(section.dataset.started);
      if (state === "running" && started) set("job-duration", seconds(Date.now() / 1000 - started));
    }, 1000);
  }

  // ---- the run form: each parameter checked against its rule's pattern ---------------

  function initRun() {
    for (const form of document.querySelectorAll("form.command")) {
      const inputs = [...form.querySelectorAll("input[data-pattern]")];
      const checks = inputs.map((input) => {
        const source = input.dataset.pattern;
        if (!source) return () => true;
        let pattern;
        try {
          pattern = new RegExp(`^(?:${source})$`);  // Python's ASCII classes = JS's without u
        } catch (error) {
          return () => true;  // a Python-only pattern: the server checks it
        }
        return () => {
          const ok = pattern.test(input.value);
          input.setCustomValidity(ok ? "" : `must match ${source}`);
          input.classList.toggle("invalid", !ok);
          return ok;
        };
      });
      inputs.forEach((input, i) => input.addEventListener("input", checks[i]));
      form.addEventListener("submit", (event) => {
        const bad = checks.map((check) => check()).indexOf(false);
        if (bad !== -1) {
          event.preventDefault();
          form.querySelector(".form-error").textContent =
            `Parameter ${bad + 1} ${inputs[bad].validationMessage}.`;
          inputs[bad].reportValidity();
        }
      });
    }
  }

  // ---- queues ------------------------------------------------------------------------

  function initQueue() {
    const body = document.getElementById("queue-rows");
    let timer = null;
    async function refresh() {
      timer = null;
      const answer = await fetch("/ui/queue", { credentials: "same-origin" });
      if (!answer.ok) return;
      const data = await answer.json();
      document.getElementById("running-total").textContent = data.running;
      body.replaceChildren(...data.queues.map((q) => {
        const tr = el("tr");
        tr.dataset.name = q.name;
        const link = el("a", null, q.name);
        link.href = "/?" + new URLSearchParams({ name: q.name });
        const name = el("td");
        name.append(link);
        tr.append(name, el("td", "running", `${q.running} / ${q.limit}`), el("td", "waiting", q.waiting));
        return tr;
      }));
    }
    follow("/ui/events", {
      job: () => { if (!timer) timer = setTimeout(refresh, 300); },
      resync: refresh,
      open: refresh,
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const jobs = document.getElementById("jobs");
    if (jobs && jobs.dataset.live) initJobs(jobs);
    const job = document.getElementById("job");
    if (job) initJob(job);
    if (document.getElementById("run")) initRun();
    const queue = document.getElementById("queue");
    if (queue && queue.dataset.live === "true") initQueue();
  });
})();
