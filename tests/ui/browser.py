"""Debian's chromium, headless, driven through Debian's chromedriver with selenium.

chromedriver is started here as a `ManagedProcess` (its own process group, which the
chromium processes it launches join), and selenium talks to it as a remote end on
127.0.0.1, so selenium's driver manager never runs (it would try to download). Stopping
the process group ends chromedriver and every chromium process, whatever the test did.

chromium runs with a fresh profile and without its background connections (this
machine's closed network refuses them): `CHROMIUM_FLAGS`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.processes import ManagedProcess, free_port, http_status
from tests.support.tools import remove_tree, require_tool, skip_or_fail

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-proxy-server",
)


class Browser:
    """One chromium session; `driver` is selenium's WebDriver."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        driver.command_executor.add_command("cdp", "POST", "/session/$sessionId/goog/cdp/execute")

    def cdp(self, cmd: str, **params: Any) -> Any:
        return self.driver.execute("cdp", {"cmd": cmd, "params": params})["value"]

    def size(self, width: int, height: int) -> None:
        self.driver.set_window_size(width, height)

    def dark(self, on: bool) -> None:
        features = [{"name": "prefers-color-scheme", "value": "dark" if on else "light"}]
        self.cdp("Emulation.setEmulatedMedia", features=features)

    def screenshot(self, path: Path) -> Path:
        """The whole page (not just the window) as a PNG."""
        metrics = self.cdp("Page.getLayoutMetrics")
        content = metrics.get("cssContentSize") or metrics["contentSize"]
        width, height = self.driver.get_window_size().values()
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            width=int(self.driver.execute_script("return window.innerWidth")),
            height=min(int(content["height"]) + 1, 8000),
            deviceScaleFactor=1,
            mobile=False,
        )
        try:
            assert self.driver.save_screenshot(str(path)), path
        finally:
            self.cdp("Emulation.clearDeviceMetricsOverride")
            self.driver.set_window_size(width, height)
        return path

    def resources(self) -> list[str]:
        """Every URL the current page loaded (the page itself, stylesheet, script, …)."""
        entries = self.driver.execute_script(
            "return performance.getEntriesByType('navigation')"
            ".concat(performance.getEntriesByType('resource'))"
            ".map(function (e) { return e.name; })"
        )
        return [str(e) for e in entries]

    def clipboard(self) -> str:
        """The clipboard's text, read by the page (permission granted through CDP)."""
        return str(
            self.driver.execute_async_script(
                "var done = arguments[arguments.length - 1];"
                "navigator.clipboard.readText().then(done, function (e) { done('ERROR ' + e); });"
            )
        )


@contextmanager
def chromium(workdir: Path) -> Iterator[Browser]:
    """A headless chromium session for the block; everything it started is stopped after."""
    binary = require_tool("chromium")
    driver_binary = require_tool("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    port = free_port()
    process = ManagedProcess(
        [driver_binary, f"--port={port}", "--allowed-ips=127.0.0.1", "--log-level=WARNING"],
        name="chromedriver",
        log_path=workdir / "chromedriver.log",
    ).start()
    profile = Path(tempfile.mkdtemp(prefix="rp-chromium-", dir=workdir))
    driver = None
    try:
        process.wait_for(
            lambda: http_status(f"http://127.0.0.1:{port}/status") == 200,
            timeout=30,
            what="chromedriver /status",
        )
        options = Options()
        options.binary_location = binary
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
            options.add_argument(flag)
        driver = webdriver.Remote(command_executor=f"http://127.0.0.1:{port}", options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield Browser(driver)
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):  # the group is killed below either way
                driver.quit()
        process.stop()  # chromedriver and the chromium processes of its group
        remove_tree(profile)
