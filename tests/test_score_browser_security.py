"""The rating page against another web site, in a real browser (Debian's Chromium, headless): the site
cannot frame the page, cannot change a score from its own origin, and a DNS name rebound to 127.0.0.1
gets nothing. scores.json is checked on disk."""

import contextlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import sync_playwright
from score_round import CHROMIUM, CHROMIUM_ARGS, read_json, serving, write_round

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
REBOUND = "rebound.example"  # the browser resolves it to 127.0.0.1, as an attacker's DNS would


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"])
        yield browser
        browser.close()


@contextlib.contextmanager
def other_site(html):
    """Another web site on another port of this machine, serving `html` at /; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    write_round(folder, [3, 8])
    return folder


def test_another_site_cannot_frame_the_page(browser, samples):
    with serving(samples, samples / "scores.json") as url:
        page = browser.new_page()
        messages = []
        page.on("console", lambda message: messages.append(message.text))
        with other_site(f'<iframe id="victim" src="{url}/" width="800" height="600"></iframe>') as site:
            page.goto(site)
            page.wait_for_timeout(1500)
            frames = [frame for frame in page.frames if frame != page.main_frame]
            assert len(frames) == 1
            assert frames[0].locator("#counter").count() == 0, "the rating page loaded inside another site"
            assert any("X-Frame-Options" in text or "frame-ancestors" in text for text in messages), messages
        # and the same page opened directly works
        page.goto(url + "/")
        page.locator(".tile").first.wait_for()
        page.close()


def test_another_site_cannot_change_a_score(browser, samples):
    with serving(samples, samples / "scores.json") as url:
        script = f"""<script>
            // a simple POST needs no preflight: the browser sends it and only hides the answer
            fetch("{url}/api/score", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                                       body: JSON.stringify({{file: "3.png", score: 5}})}})
              .finally(() => document.title = "sent");
            fetch("{url}/api/score", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                                       body: JSON.stringify({{file: "8.png", score: -5}})}})
              .catch(() => document.body.dataset.blocked = "yes");
        </script>"""
        page = browser.new_page()
        with other_site(script) as site:
            page.goto(site)
            page.wait_for_function("document.title === 'sent' && document.body.dataset.blocked === 'yes'")
            time.sleep(0.3)
        assert not (samples / "scores.json").exists()
        page.close()


def test_a_rebound_dns_name_gets_nothing(browser, samples):
    with serving(samples, samples / "scores.json") as url:
        port = url.rsplit(":", 1)[1]
        page = browser.new_page()
        response = page.goto(f"http://{REBOUND}:{port}/")
        assert response.status == 403
        assert "own address" in page.content() and page.locator(".tile").count() == 0
        # the attacker's page is "same-origin" with the rebound name: it can send, the server refuses by Host
        status = page.evaluate("""async () => (await fetch("/api/score", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({file: "3.png", score: 5})})).status""")
        assert status == 403
        assert not (samples / "scores.json").exists()
        # the page itself, at its own address, still rates
        page.goto(url + "/")
        page.locator(".tile").first.click()
        page.keyboard.press("4")
        deadline = time.monotonic() + 5
        while not (samples / "scores.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_json(samples / "scores.json") == {"3.png": 4}
        page.close()
