"""A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (standard library only): load a
page in Debian's headless Chromium, read element boxes from the live DOM, screenshot a clip of the page."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def find_binary() -> Optional[str]:
    """The browser itself: Debian's /usr/bin/chromium is a wrapper script that keeps no extra descriptors."""
    for path in ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


class Chromium:
    def __init__(self, binary: str, profile: Path, width: int = 1000, height: int = 1200):
        r_in, self._w_in = os.pipe()
        self._r_out, w_out = os.pipe()
        # the browser reads commands on fd 3 and writes replies on fd 4; move our ends above 4 first
        r_in, w_out = fcntl.fcntl(r_in, fcntl.F_DUPFD, 10), fcntl.fcntl(w_out, fcntl.F_DUPFD, 10)

        def child():
            os.dup2(r_in, 3)
            os.dup2(w_out, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r_in)
        os.close(w_out)
        self._buf, self._id, self._session = b"", 0, None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                  flatten=True)["sessionId"]

    def call(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self._session
        os.write(self._w_in, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r_out, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def load(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while self.evaluate("document.readyState") != "complete":
            if time.time() > deadline:
                raise TimeoutError(url)
            time.sleep(0.1)

    def boxes(self, selector: str) -> list[dict]:
        return json.loads(self.evaluate(
            f"JSON.stringify([...document.querySelectorAll({json.dumps(selector)})].map(e => {{"
            "const r = e.getBoundingClientRect(); return {id: e.id, x: r.x + scrollX, y: r.y + scrollY, "
            "width: r.width, height: r.height, paths: e.querySelectorAll('path').length}}))"))

    def screenshot(self, box: dict) -> bytes:
        clip = {k: box[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w_in)
        os.close(self._r_out)
