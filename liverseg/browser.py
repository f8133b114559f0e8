"""Open an HTML report in a real browser (headless Chromium) and say what a person would see.

The scoring report is a single self-contained HTML file; whether it renders is a question for a
browser, not for string matching. :func:`check_page` starts Chromium headless and talks to it
over the Chrome DevTools Protocol on a pipe (``--remote-debugging-pipe``: the browser reads
commands on its file descriptor 3 and answers on 4, NUL-terminated JSON), so it needs no driver,
no network port and no Python package beyond the standard library. It collects console errors
and uncaught exceptions, the state of every picture (loaded, natural width), the tables, and a
full-page screenshot.

Chromium comes from the system (Debian: ``apt-get install -y chromium``); nothing is downloaded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from liverseg.errors import LiversegError

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: Flags for a headless run as root on a machine without GPU or network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe")
_PAGE_STATE_JS = """JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                  naturalWidth: i.naturalWidth})),
  tables: Array.from(document.querySelectorAll('table')).map(t => t.rows.length),
  height: Math.ceil(document.documentElement.scrollHeight),
  text: document.body ? document.body.innerText.slice(0, 20000) : ''
})"""


@dataclass
class PageCheck:
    """What the browser saw: console errors, pictures, tables (row counts) and the page text."""

    title: str
    images: list[dict]
    tables: list[int]
    text: str
    console_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]


def find_browser() -> str | None:
    """The Chromium executable on PATH (LIVERSEG_BROWSER overrides), or None."""
    override = os.environ.get("LIVERSEG_BROWSER")
    if override:
        return shutil.which(override) or (override if Path(override).is_file() else None)
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DevTools:
    """A minimal DevTools Protocol client on the browser's pipe (commands, replies, events)."""

    def __init__(self, to_browser: int, from_browser: int) -> None:
        self.to_browser, self.from_browser = to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the browser did not answer in time")
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if ready:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its DevTools pipe")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        message: dict = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)


def _console_errors(events: list[dict]) -> list[str]:
    """Errors a person would see in the console: console.error/assert, uncaught exceptions,
    and the browser's own error log (failed loads, blocked resources)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return errors


def _spawn(argv: list[str]) -> tuple[int, int, int]:
    """Start the browser in its own process group with the DevTools pipe on its fds 3 (commands
    in) and 4 (replies out); returns (pid, fd to write commands, fd to read replies)."""
    import fcntl

    cmd_read, to_browser = os.pipe()
    from_browser, out_write = os.pipe()
    # Copies at fds >= 10, closed on exec, so the dup2 actions below cannot clobber each other.
    ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_read, out_write)]
    devnull = fcntl.fcntl(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), fcntl.F_DUPFD_CLOEXEC, 10)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
               (os.POSIX_SPAWN_DUP2, devnull, 2), (os.POSIX_SPAWN_DUP2, ends[0], 3),
               (os.POSIX_SPAWN_DUP2, ends[1], 4)]
    try:
        pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setpgroup=0)
    finally:
        for fd in (cmd_read, out_write, devnull, *ends):
            os.close(fd)
    return pid, to_browser, from_browser


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for the browser to exit; kill its process group when it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _load(tools: _DevTools, url: str, screenshot: str | Path | None, width: int,
          timeout: float) -> tuple[dict, Path | None]:
    """Open ``url`` in a new tab, read the page's state and optionally take a full-page shot."""
    target = tools.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
    session = tools.call("Target.attachToTarget", {"targetId": target["targetId"],
                                                   "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        tools.call(f"{domain}.enable", session=session)
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    tools.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
    tools.call("Page.navigate", {"url": url}, session=session)
    tools.wait_for("Page.loadEventFired", timeout=timeout)
    state = json.loads(tools.call("Runtime.evaluate", {"expression": _PAGE_STATE_JS,
                                                       "returnByValue": True},
                                  session=session)["result"]["value"])
    shot = None
    if screenshot is not None:
        metrics["height"] = min(int(state["height"]), 16000)
        tools.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
        data = tools.call("Page.captureScreenshot", {"format": "png"}, session=session,
                          timeout=timeout)["data"]
        shot = Path(screenshot)
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(data))
    tools.call("Runtime.evaluate", {"expression": "1"}, session=session)  # late console messages
    return state, shot


def check_page(html_file: str | Path, screenshot: str | Path | None = None, *, width: int = 1280,
               timeout: float = 60.0, browser: str | None = None) -> PageCheck:
    """Load ``html_file`` in headless Chromium and report what rendered (see :class:`PageCheck`);
    with ``screenshot``, also write a full-page PNG there. Raises LiversegError when no browser
    is installed."""
    executable = browser or find_browser()
    if executable is None:
        raise LiversegError("no Chromium found (looked for " + ", ".join(BROWSER_NAMES) + "); install "
                            "it, e.g. apt-get install -y chromium, or set LIVERSEG_BROWSER")
    url = Path(html_file).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="liverseg-chromium-") as profile:
        pid, to_browser, from_browser = _spawn(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900",
             "about:blank"])
        try:
            tools = _DevTools(to_browser, from_browser)
            state, shot = _load(tools, url, screenshot, width, timeout)
            errors = _console_errors(tools.events)
            with contextlib.suppress(TimeoutError, RuntimeError):
                tools.call("Browser.close", timeout=10)
        finally:
            os.close(to_browser)
            os.close(from_browser)
            _reap(pid)
    return PageCheck(title=state["title"], images=state["images"], tables=state["tables"],
                     text=state["text"], console_errors=errors, screenshot=shot)
