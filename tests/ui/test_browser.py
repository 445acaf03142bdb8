"""Issue 15 in a real browser: Debian's chromium (headless) on regproxy's web page.

Images are pushed with skopeo into regproxy processes; the browser then reads the
overview, filters it, opens a repository and an image, copies a `podman pull` command
(which podman then runs, word for word), sees a pull through the cache in the cache
numbers, and signs in to see `team/*`. A screenshot of each page goes to the test's
temporary folder (light, dark and phone width for the overview).

Skipped where chromium, chromedriver, selenium, skopeo or podman are missing, except in
CI (`CI=true`), where `.ci/run` installs them and a missing one fails.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.auth import PASSWORDS, write_htpasswd
from tests.support.images import make_image, make_index, write_oci_layout
from tests.support.podman import Podman
from tests.support.processes import RegproxyProcess
from tests.support.skopeo import Skopeo
from tests.ui.browser import Browser, chromium

pytestmark = [pytest.mark.clients, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-browser")


@pytest.fixture(scope="module")
def seeder(workdir: Path) -> Skopeo:
    return Skopeo(workdir / "skopeo")


def push(seeder: Skopeo, content: object, ref: str, tag: str, *flags: str) -> None:
    """Copy an OCI layout made here to `docker://ref:tag`, digests preserved."""
    layout = Path(seeder.workdir) / "layouts" / ref.replace("/", "_").replace(":", "_") / tag
    write_oci_layout(layout, content, tag)  # type: ignore[arg-type]
    extra = ["--all"] if hasattr(content, "images") else []
    seeder.copy(
        f"oci:{layout}:{tag}", f"docker://{ref}:{tag}", "--preserve-digests", *extra, *flags
    )


@pytest.fixture(scope="module")
def upstream(workdir: Path, seeder: Skopeo) -> Iterator[RegproxyProcess]:
    server = RegproxyProcess(workdir / "upstream")
    server.start()
    try:
        push(seeder, make_image("ui-tool", (64 * 1024, 32 * 1024)), f"{server.host}/lib/tool", "v1")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry(workdir: Path, seeder: Skopeo, upstream: RegproxyProcess) -> Iterator[RegproxyProcess]:
    """Open regproxy (no auth) caching `upstream` as `p/up/…`, with three repositories."""
    config = (
        '[ui]\ntitle = "Test registry"\nrefresh_interval = 0\n\n'
        f"[proxy.upstreams.up]\nurl = {json.dumps(upstream.url)}\n"
    )
    server = RegproxyProcess(workdir / "open", extra_config=config)
    server.start()
    try:
        push(seeder, make_index("ui-app", (96 * 1024, 48 * 1024)), f"{server.host}/team/app", "v1")
        push(seeder, make_image("ui-cli", (40 * 1024,)), f"{server.host}/tools/cli", "1.0")
        push(seeder, make_image("ui-web", (30 * 1024,)), f"{server.host}/web/frontend", "latest")
        yield server
    finally:
        server.stop()


RULES_TOML = """
[[auth.rules]]
repository = "team/*"
pull = ["@authenticated"]
push = ["alice"]
delete = []

[[auth.rules]]
repository = "*"
pull = ["anonymous"]
push = ["alice"]
delete = []
"""


@pytest.fixture(scope="module")
def auth_registry(workdir: Path, seeder: Skopeo) -> Iterator[RegproxyProcess]:
    """regproxy with `[auth]`: `team/*` for signed-in users, the rest for everybody."""
    htpasswd = write_htpasswd(workdir / "htpasswd")
    config = (
        "[ui]\nrefresh_interval = 0\n\n"
        f"[auth]\nhtpasswd = {json.dumps(str(htpasswd))}\n{RULES_TOML}"
    )
    server = RegproxyProcess(workdir / "auth", extra_config=config)
    server.start()
    try:
        creds = f"--dest-creds=alice:{PASSWORDS['alice']}"
        push(
            seeder, make_image("ui-secret", (20 * 1024,)), f"{server.host}/team/secret", "v1", creds
        )
        push(seeder, make_image("ui-open", (20 * 1024,)), f"{server.host}/tools/open", "v1", creds)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(workdir: Path) -> Iterator[Browser]:
    with chromium(workdir) as session:
        yield session


def css(browser: Browser, selector: str) -> list:
    return browser.driver.find_elements("css selector", selector)  # By.CSS_SELECTOR


def wait_for(browser: Browser, condition, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser.driver, timeout).until(lambda _driver: condition())


def visible_repositories(browser: Browser) -> list[str]:
    return [
        row.get_attribute("data-name")
        for row in css(browser, "#repos tbody tr")
        if row.is_displayed()
    ]


def sideways_overflow(browser: Browser) -> int:
    """How many CSS pixels the page sticks out to the right of the window."""
    return int(
        browser.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
    )


def assert_only_this_host(browser: Browser, base: str) -> None:
    loaded = browser.resources()
    assert loaded, "the page loaded nothing?"
    assert all(url.startswith(base + "/") for url in loaded), loaded
    html = browser.driver.page_source
    assert "Traceback" not in html


# ---- the open registry ----------------------------------------------------------------------


def test_overview_lists_and_filters(
    browser: Browser, registry: RegproxyProcess, tmp_path: Path
) -> None:
    browser.size(1280, 900)
    browser.driver.get(f"{registry.url}/")
    assert browser.driver.title == "Test registry"
    assert visible_repositories(browser) == ["team/app", "tools/cli", "web/frontend"]
    assert_only_this_host(browser, registry.url)
    assert sideways_overflow(browser) <= 0
    browser.screenshot(tmp_path / "overview.png")
    browser.dark(True)
    browser.screenshot(tmp_path / "overview-dark.png")
    background = browser.driver.execute_script(
        "return getComputedStyle(document.body).backgroundColor"
    )
    assert background == "rgb(13, 17, 23)", background  # the dark palette took over
    browser.dark(False)

    box = css(browser, "#filter")[0]
    box.send_keys("front")
    wait_for(browser, lambda: visible_repositories(browser) == ["web/frontend"])
    assert css(browser, "#filter-count")[0].text == "Showing 1 of 3"
    browser.screenshot(tmp_path / "overview-filtered.png")
    box.clear()
    box.send_keys("t")  # team/app, tools/cli and web/frontend all have a "t"
    wait_for(browser, lambda: len(visible_repositories(browser)) == 3)

    # phone width: nothing sticks out sideways
    browser.size(390, 844)
    browser.driver.get(f"{registry.url}/")
    assert sideways_overflow(browser) <= 0
    browser.screenshot(tmp_path / "overview-phone.png")
    browser.size(1280, 900)


def test_repository_page_and_the_copied_podman_pull(
    browser: Browser, registry: RegproxyProcess, podman: Podman, tmp_path: Path
) -> None:
    browser.driver.get(f"{registry.url}/")
    css(browser, 'a[href="/ui/repo/team/app"]')[0].click()
    wait_for(browser, lambda: browser.driver.current_url.endswith("/ui/repo/team/app"))
    row = css(browser, 'tr[data-tag="v1"]')[0]
    assert "OCI index" in row.text and "linux/amd64, linux/arm64" in row.text
    assert_only_this_host(browser, registry.url)
    browser.screenshot(tmp_path / "repository.png")

    # copy the podman command of tag v1 with the page's button, read it off the clipboard
    browser.cdp(
        "Browser.grantPermissions",
        origin=registry.url,
        permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
    )
    button = row.find_element("css selector", 'button[data-copy^="podman "]')
    button.click()
    wait_for(browser, lambda: button.text == "copied")
    copied = browser.clipboard()
    assert copied == button.get_attribute("data-copy") == f"podman pull {registry.host}/team/app:v1"
    assert css(browser, "#copy-status")[0].get_attribute("textContent") == f"Copied: {copied}"

    # run exactly that: the registry is plain HTTP (registries.conf says so), and the
    # signature policy comes from $HOME (podman's global flags only choose its storage)
    conf = Path(podman.env["CONTAINERS_REGISTRIES_CONF"])
    conf.write_text(
        conf.read_text() + f'\n[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    home = tmp_path / "home"
    (home / ".config" / "containers").mkdir(parents=True)
    (home / ".config" / "containers" / "policy.json").write_text(podman.config.policy.read_text())
    podman.env["HOME"] = str(home)
    words = shlex.split(copied)
    assert words[0] == "podman"
    podman(*words[1:], timeout=180)
    info = podman.image_inspect(words[-1])
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"


def test_image_page_shows_the_layers(
    browser: Browser, registry: RegproxyProcess, tmp_path: Path
) -> None:
    browser.driver.get(f"{registry.url}/ui/repo/tools/cli")
    css(browser, 'tr[data-tag="1.0"] a.digest')[0].click()
    wait_for(browser, lambda: "/ui/image/tools/cli@sha256:" in browser.driver.current_url)
    layers = css(browser, "#layers tbody tr")
    assert len(layers) == 1 and "KiB" in layers[0].text  # 40 KiB of random bytes, gzipped
    assert "regproxy test layer 0" in css(browser, "#history")[0].text
    environment = css(browser, "#env")[0]
    assert environment.get_attribute("open") is None  # values hidden until expanded
    assert not css(browser, "#env table")[0].is_displayed()
    environment.find_element("tag name", "summary").click()
    wait_for(browser, lambda: css(browser, "#env table")[0].is_displayed())
    assert "PATH" in css(browser, "#env table")[0].text
    assert_only_this_host(browser, registry.url)
    browser.screenshot(tmp_path / "image.png")

    # an index: its platforms link to each child's own page
    browser.driver.get(f"{registry.url}/ui/repo/team/app")
    css(browser, 'tr[data-tag="v1"] a.digest')[0].click()
    wait_for(browser, lambda: len(css(browser, "#children tbody tr")) == 2)
    assert "linux/arm64" in css(browser, "#children")[0].text
    browser.screenshot(tmp_path / "image-index.png")


def test_a_pull_through_the_cache_shows_in_its_numbers(
    browser: Browser, registry: RegproxyProcess, seeder: Skopeo, tmp_path: Path
) -> None:
    def cell(name: str) -> str:
        return str(css(browser, f'tr[data-upstream="up"] td.{name}')[0].text)

    browser.driver.get(f"{registry.url}/")
    assert cell("misses") == "0" and cell("fetched") == "0 B"
    source = f"docker://{registry.host}/p/up/lib/tool:v1"
    seeder.copy(source, f"oci:{tmp_path / 'first'}:v1")
    browser.driver.refresh()
    assert int(cell("misses")) >= 3 and cell("fetched") != "0 B"  # manifest, config, layers
    assert "p/up/lib/tool" in visible_repositories(browser)
    seeder.copy(source, f"oci:{tmp_path / 'second'}:v1")
    browser.driver.refresh()
    assert int(cell("hits")) >= 3 and cell("served") != "0 B"
    assert "reachable" in css(browser, "#upstreams")[0].text
    browser.screenshot(tmp_path / "overview-cache.png")
    browser.driver.get(f"{registry.url}/ui/repo/p/up/lib/tool")
    assert "cached" in css(browser, ".summary")[0].text
    browser.screenshot(tmp_path / "repository-cached.png")


def test_bad_paths_are_a_404_page(
    browser: Browser, registry: RegproxyProcess, tmp_path: Path
) -> None:
    for path in ("/ui/nope", "/ui/repo/no/such", "/ui/image/tools/cli@sha256:00"):
        browser.driver.get(f"{registry.url}{path}")
        assert css(browser, "h1")[0].text == "Not found"
        assert "Traceback" not in browser.driver.page_source
    browser.screenshot(tmp_path / "not-found.png")


# ---- with auth -----------------------------------------------------------------------------


def test_anonymous_and_signed_in_viewers(
    browser: Browser, auth_registry: RegproxyProcess, tmp_path: Path
) -> None:
    base = auth_registry.url
    browser.driver.delete_all_cookies()
    browser.driver.get(f"{base}/")
    assert visible_repositories(browser) == ["tools/open"]
    assert "team/" not in browser.driver.page_source
    browser.screenshot(tmp_path / "overview-anonymous.png")
    browser.driver.get(f"{base}/ui/repo/team/secret")
    assert css(browser, "h1")[0].text == "Not found"

    browser.driver.get(f"{base}/")
    css(browser, 'a[href^="/ui/login"]')[0].click()
    wait_for(browser, lambda: bool(css(browser, "#username")))
    css(browser, "#username")[0].send_keys("alice")
    css(browser, "#password")[0].send_keys("wrong")
    css(browser, "form.login button")[0].click()
    wait_for(browser, lambda: "Wrong user name or password" in browser.driver.page_source)
    browser.screenshot(tmp_path / "login-refused.png")
    css(browser, "#username")[0].clear()
    css(browser, "#username")[0].send_keys("alice")
    css(browser, "#password")[0].send_keys(PASSWORDS["alice"])
    css(browser, "form.login button")[0].click()
    wait_for(browser, lambda: "Signed in as" in browser.driver.page_source)
    assert visible_repositories(browser) == ["team/secret", "tools/open"]
    cookie = browser.driver.get_cookie("regproxy_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert browser.driver.execute_script("return document.cookie") == ""  # HttpOnly
    assert_only_this_host(browser, base)
    browser.screenshot(tmp_path / "overview-signed-in.png")
    browser.driver.get(f"{base}/ui/repo/team/secret")
    assert css(browser, "h1")[0].text == "team/secret"

    css(browser, ".account button")[0].click()  # sign out
    wait_for(browser, lambda: visible_repositories(browser) == ["tools/open"])
