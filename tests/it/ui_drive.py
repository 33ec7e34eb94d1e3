"""Drives Debian's headless Chromium through keyward's dashboard for
tests/it/ui.rs: signs in through the form, reads the counts from the DOM
(data-testid elements), opens an identity page, signs out, and saves
screenshots. Reads its settings as JSON on stdin (the token is never on a
command line); prints one JSON line of what it saw. Makes no request off
loopback: the dashboard has no external resource, and Chromium's own
background traffic is off by flags."""
import json
import sys

from playwright.sync_api import sync_playwright

cfg = json.loads(sys.stdin.read())
base = cfg["base"]
token = cfg["token"]
artifacts = cfg["artifacts"]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Trust exactly the test server's key, nothing else.
    "--ignore-certificate-errors-spki-list=" + cfg["spki"],
]

COUNTS = [
    "identities-total",
    "unowned-count",
    "dormant-count",
    "unused-grants-count",
    "long-lived-count",
    "rotations-overdue-count",
    "rotations-failing-count",
    "attestations-due-count",
    "expiring-count",
    "certificates-expiring-count",
    "leases-expiring-count",
]
IDENTITY = [
    "identity-name",
    "identity-kind",
    "identity-owner",
    "identity-tokens",
    "unused-rules-count",
    "reads-count",
    "attestation-state",
    "anomalies-count",
]


def text_of(page, testid):
    loc = page.locator(f'[data-testid="{testid}"]')
    if loc.count() == 0:
        return None
    return loc.first.inner_text().strip()


def bars(page, testid):
    out = {}
    for el in page.locator(f'[data-testid="{testid}-bar"]').all():
        out[el.get_attribute("data-label")] = el.get_attribute("data-count")
    return out


seen = {"urls": []}
with sync_playwright() as p:
    ctx = p.chromium.launch_persistent_context(
        cfg["profile"],
        executable_path="/usr/bin/chromium",
        headless=True,
        args=FLAGS,
        viewport={"width": 1200, "height": 900},
    )
    page = ctx.new_page()
    # A generous bound on every wait (a loaded machine), never a sleep.
    page.set_default_timeout(90000)
    page.on("request", lambda r: seen["urls"].append(r.url))
    page.goto(base + "/ui/")
    # No session: the sign-in form.
    assert page.url.endswith("/ui/sign-in"), page.url
    page.fill('[data-testid="token"]', token)
    page.click('[data-testid="sign-in"]')
    try:
        page.wait_for_selector('[data-testid="identities-total"]')
    except Exception:
        page.screenshot(path=artifacts + "/sign-in-failed.png", full_page=True)
        print("after sign-in at", page.url, page.content()[:2000], file=sys.stderr)
        raise
    seen["overview_url"] = page.url
    seen["overview"] = {k: text_of(page, k) for k in COUNTS}
    seen["kinds"] = bars(page, "chart-kind")
    seen["owners"] = bars(page, "chart-owner")
    seen["dormant"] = [
        a.inner_text().strip()
        for a in page.locator('[data-testid="dormant"] [data-testid="identity-link"]').all()
    ]
    page.screenshot(path=artifacts + "/overview.png", full_page=True)
    cookies = [c for c in ctx.cookies() if c["name"] == "kw_ui"]
    assert len(cookies) == 1, cookies
    seen["cookie_http_only"] = cookies[0]["httpOnly"]
    seen["cookie_secure"] = cookies[0]["secure"]
    seen["cookie_same_site"] = cookies[0]["sameSite"]
    seen["document_cookie"] = page.evaluate("document.cookie")

    # Open the identity from its link in the unused-grants table.
    page.click('[data-testid="unused-grants"] a:text-is("%s")' % cfg["identity"])
    page.wait_for_selector('[data-testid="identity-name"]')
    seen["identity"] = {k: text_of(page, k) for k in IDENTITY}
    page.screenshot(path=artifacts + "/identity.png", full_page=True)

    page.click('[data-testid="sign-out"]')
    page.wait_for_url("**/ui/sign-in")
    page.goto(base + "/ui/")
    seen["after_sign_out"] = "/" + page.url.split("/", 3)[3]
    ctx.close()

print(json.dumps(seen))
