"""Open a page in headless Chromium as a person would, over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ended by NUL on file descriptors 3 and 4), with the
standard library only. Used by the QC report's browser test, and to take the docs' screenshot:

    python tests/browser.py REPORT/index.html docs/qc_report.png
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Every image made to load (lazy ones too) and awaited; then what each one is.
_IMAGES = """(async () => {
  const images = [...document.images];
  images.forEach(i => { i.loading = 'eager'; });
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  return images.map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth}));
})()"""
_LINKS = "[...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))"


def find_browser() -> str | None:
    """The Chromium executable on PATH, if any."""
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class Page:
    """One browser tab: ``open(url)`` returns what it loaded; ``screenshot`` saves a PNG."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.timeout, self.next_id, self.events = timeout, 0, []
        to_browser, self._browser_in = os.pipe()
        self._browser_out, from_browser = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="medseg-chromium-")

        def wire_pipes():  # in the child: the protocol wants its ends on fds 3 and 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",  # containers run as root
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=wire_pipes,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._browser_in, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the browser stopped answering")
            chunk = os.read(self._browser_out, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> dict:
        """Load ``url`` and wait for it. Returns ``requests`` (every URL the page asked for),
        ``images`` (src, complete, natural width of each, after loading them all) and ``links``."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read())
        images = self.evaluate(_IMAGES)
        links = self.evaluate(_LINKS)
        self.call("Runtime.evaluate", {"expression": "1"}, session=True)  # let late events arrive
        requests = [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        return {"requests": requests, "images": images, "links": links}

    def evaluate(self, expression: str):
        found = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=True,
        )
        if "exceptionDetails" in found:
            raise RuntimeError(f"page script failed: {found['exceptionDetails']}")
        return found["result"].get("value")

    def screenshot(self, png: str | Path, full_page: bool = False) -> Path:
        params = {"format": "png", "captureBeyondViewport": full_page}
        data = self.call("Page.captureScreenshot", params, session=True)["data"]
        Path(png).write_bytes(base64.b64decode(data))
        return Path(png)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._browser_in)
        os.close(self._browser_out)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    page_file, png = Path(sys.argv[1]).resolve(), sys.argv[2]
    browser = find_browser()
    if browser is None:
        sys.exit("no Chromium on PATH (apt-get install chromium)")
    with Page(browser) as page:
        seen = page.open(page_file.as_uri())
        page.screenshot(png)
    print(f"{len(seen['images'])} images, {len(seen['requests'])} requests; screenshot {png}")
