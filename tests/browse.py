#!/usr/bin/env python3
"""Browse pages in headless Chromium (the system's /usr/bin/chromium, driven by Playwright)
the way a person would, for the tests.

usage: browse.py BASE_URL TOKEN OUT_JSON PATH...
Opens each PATH under BASE_URL (sending `Authorization: Bearer TOKEN` when TOKEN is not "-"),
at 1280 and at 390 px wide, and records the page's width (document scrollWidth against the
viewport), its time-axis labels and empty sections; then follows every same-origin link on it
once, recording status and content type, and whether a text body is shown as text. Every
request that fails or answers 4xx/5xx is recorded. Writes one JSON document to OUT_JSON."""
import json
import sys
from urllib.parse import urljoin, urlparse

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    base, token, out_path, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    headers = {} if token == "-" else {"Authorization": f"Bearer {token}"}
    result = {"pages": {}, "links": {}, "failed": []}
    origin = urlparse(base).netloc
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        for width in (1280, 390):
            ctx = browser.new_context(viewport={"width": width, "height": 900},
                                      extra_http_headers=headers, accept_downloads=True)
            page = ctx.new_page()
            # A request the browser cancels itself (net::ERR_ABORTED: a lazy image left
            # behind when the test navigates on) is no failure of the server.
            page.on("requestfailed", lambda r: r.failure != "net::ERR_ABORTED" and
                    result["failed"].append({"url": r.url, "error": r.failure}))
            page.on("response", lambda r: r.status >= 400 and result["failed"].append(
                {"url": r.url, "status": r.status}))
            for path in paths:
                url = urljoin(base, path)
                # Every request of the page (lazy images included) done before it is measured.
                resp = page.goto(url, wait_until="networkidle")
                info = page.evaluate("""() => ({
                    scrollWidth: document.documentElement.scrollWidth,
                    innerWidth: window.innerWidth,
                    viewportMeta: !!document.querySelector('meta[name=viewport]'),
                    emptySections: [...document.querySelectorAll('section, div.box, .card, .recs, ul, table')]
                        .filter(e => e.innerText.trim() === '').length,
                    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
                    wide: [...document.querySelectorAll('body *')]
                        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
                        .filter(e => !e.closest('.scroll, table'))
                        .slice(0, 5).map(e => e.tagName + ' ' + e.textContent.slice(0, 60)),
                    images: [...document.images].map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
                })""")
                # file:// pages have no HTTP status: 200 when they loaded.
                info["status"] = resp.status if resp and resp.status else 200
                result["pages"][f"{path}@{width}"] = info
                if width != 1280:
                    continue
                for link in info["links"]:
                    if (urlparse(link).scheme not in ("http", "https")
                            or urlparse(link).netloc != origin or link in result["links"]):
                        continue
                    target = link.split("#")[0]
                    rec = {}
                    try:
                        r = page.goto(target, wait_until="load")
                        rec["status"] = r.status if r else 0
                        rec["content_type"] = r.headers.get("content-type", "") if r else ""
                        rec["shown_as"] = page.evaluate("document.contentType")
                        rec["text_length"] = page.evaluate(
                            "document.body ? document.body.innerText.length : 0")
                    except Exception as e:  # noqa: BLE001 - a download or an error
                        rec["error"] = str(e).splitlines()[0]
                    result["links"][link] = rec
                page.goto(url, wait_until="load")
            ctx.close()
        browser.close()
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
