"""The playground page in headless Chromium against a real `textcomplete serve` that requires an API key:
streamed text equals the API's, token log-probabilities and colours, Stop, errors at their controls, keys,
"View code" programs that run, and screenshots in light, dark and at a phone's width."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, scrape, wait_until_idle

KEY = "sk-playground-test-key-0123"
CHROMIUM = Path("/usr/bin/chromium")
NODE_DIR = Path(__file__).parent / "node"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
COMPLETIONS_499 = "textcomplete_http_requests_total{path=/v1/completions,status=499}"
COMPLETIONS_200 = "textcomplete_http_requests_total{path=/v1/completions,status=200}"
SCALE_PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run `bash scripts/install.sh --test`")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install.sh --test` (Debian's chromium package)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


def until(page, expression: str, timeout: float = 120.0) -> None:
    """Poll a JavaScript condition (the page's content security policy forbids the eval behind
    wait_for_function)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


class Page:
    """One browser tab on the playground, with the API key entered; page errors fail the test."""

    def __init__(self, browser, base: str, key: str | None = KEY, **context) -> None:
        self.context = browser.new_context(viewport=context.pop("viewport", DESKTOP), **context)
        self.page = self.context.new_page()
        self.errors: list = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(e))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(base + "/")
        self.page.wait_for_selector("body[data-ready=true]")
        if key is not None:
            self.set_key(key)

    def set_key(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.dispatch_event("#api-key", "change")

    def fill(self, **fields) -> None:
        for name, value in fields.items():
            if name == "logprobs":
                self.page.select_option("#logprobs", "" if value is None else str(value))
            elif name == "echo":
                self.page.set_checked("#echo", value)
            else:
                self.page.fill(f"#{name}", str(value))

    def run(self, submit=None) -> str:
        """Submit (by default with Ctrl+Enter), wait for the run to end; returns its state."""
        run = int(self.page.get_attribute("#output", "data-run") or 0)
        if submit is None:
            self.page.press("#prompt", "Control+Enter")
        else:
            submit()
        self.page.wait_for_selector(f'#output[data-run="{run + 1}"]:not([data-state="running"])')
        return self.page.get_attribute("#output", "data-state")

    def text(self, index: int = 0) -> str:
        return self.page.locator(f'.choice[data-index="{index}"] .completion').text_content()

    def error_at(self, field: str) -> str:
        box = self.page.locator(f"#err-{field}")
        box.wait_for(state="visible")
        return box.text_content()

    def stat(self, name: str) -> str:
        return self.page.locator(f'[data-stat="{name}"]').text_content()

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def tab(browser, server):
    t = Page(browser, server.base)
    yield t
    t.close()


def greedy(api, **fields):
    return api.completions.create(model=MODEL, temperature=0, **fields)


def test_page_is_served_without_a_key_with_its_own_files_only(server):
    for path in ("/", "/playground"):
        r = httpx.get(server.base + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        policy = r.headers["content-security-policy"]
        assert "connect-src 'self'" in policy and "script-src 'self'" in policy
    for name in ("app.js", "api.js", "render.js", "controls.js", "snippets.js", "style.css", "favicon.svg"):
        assert httpx.get(f"{server.base}/playground/{name}").status_code == 200, name
    assert httpx.get(server.base + "/playground/__init__.py").status_code == 404
    assert httpx.get(server.base + "/playground/%2e%2e%2f__init__.py").status_code == 404
    assert httpx.post(server.base + "/v1/completions", json={"model": MODEL}).status_code == 401


def body_background(t: Page) -> str:
    return t.page.evaluate("getComputedStyle(document.body).backgroundColor")


def test_every_control_has_a_label_and_no_suffix_without_fim(tab):
    assert tab.page.locator("#suffix-field").is_hidden()   # SmolLM2 cannot insert
    light = body_background(tab)
    tab.page.select_option("#theme", "dark")   # the theme chosen overrides the system's, and is kept
    assert body_background(tab) != light
    tab.page.reload()
    tab.page.wait_for_selector("body[data-ready=true]")
    assert tab.page.input_value("#theme") == "dark" and body_background(tab) != light
    unlabelled = tab.page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label') && !c.textContent.trim())
        .map(c => c.id || c.outerHTML)""")
    assert unlabelled == []


def test_streamed_text_equals_the_api_for_a_greedy_request(tab, api):
    tab.fill(prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=None)
    tab.page.evaluate("""() => {   // every text the completion shows, as it grows
        window.seen = [];
        new MutationObserver(() => {
            const c = document.querySelector('.completion');
            if (c) window.seen.push(c.textContent);
        }).observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true});
    }""")
    assert tab.run() == "done"
    expected = greedy(api, prompt="The capital of France is", max_tokens=12)
    assert tab.text() == expected.choices[0].text
    seen = [s for s in dict.fromkeys(tab.page.evaluate("window.seen")) if s]
    assert len(seen) > 1 and all(expected.choices[0].text.startswith(s) for s in seen)   # it grew as it streamed
    assert tab.stat("finish") == expected.choices[0].finish_reason
    assert tab.stat("completion_tokens") == str(expected.usage.completion_tokens)
    assert tab.stat("prompt_tokens") == str(expected.usage.prompt_tokens)
    assert tab.stat("cached_tokens").isdigit()
    assert tab.stat("fingerprint") == expected.system_fingerprint
    assert tab.stat("ttft").endswith("ms") or tab.stat("ttft").endswith(" s")
    assert all(url.startswith(str(tab.page.url).rstrip("/")) for url in tab.requests)


def test_tokens_show_the_apis_logprobs_and_are_coloured_by_probability(tab, api):
    tab.fill(prompt=SCALE_PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    assert tab.run() == "done"
    expected = greedy(api, prompt=SCALE_PROMPT, max_tokens=6, logprobs=3, echo=True).choices[0]
    assert tab.text() == expected.text
    spans = tab.page.locator(".completion .tok")
    lp = expected.logprobs
    assert spans.all_text_contents() == lp.tokens   # each token's span is its text (this prompt is ASCII)
    prompt_count = tab.page.locator(".completion .tok.prompt").count()
    assert 0 < prompt_count < len(lp.tokens)
    for i, want in enumerate(lp.token_logprobs):
        span = spans.nth(i)
        if want is None:
            assert span.get_attribute("data-logprob") is None
            continue
        assert float(span.get_attribute("data-logprob")) == pytest.approx(want, abs=1e-6)
        if i < prompt_count:
            continue
        span.hover()   # every generated token: its tooltip shows the API's values
        tip = tab.page.locator("#tooltip")
        tip.wait_for(state="visible")
        assert float(tip.locator('[data-field="logprob"]').text_content()) == pytest.approx(want, abs=6e-5)
        assert tip.locator(".alts tr").count() == len(lp.top_logprobs[i])
        assert tip.locator(".tip-token").text_content().replace("␣", " ") == lp.tokens[i]
    scored = [(p, i) for i, p in enumerate(lp.token_logprobs) if p is not None]
    (low, i_low), (high, i_high) = min(scored), max(scored)
    assert math.exp(high) > 0.9 and math.exp(low) < 0.1, scored   # the model's own spread on this prompt

    def colour(i: int) -> str:
        return spans.nth(i).evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour(i_high) != colour(i_low)
    assert spans.nth(i_high).get_attribute("data-bin") == "5" and spans.nth(i_low).get_attribute("data-bin") == "0"

    spans.nth(prompt_count).focus()   # the keyboard too: focus shows the tooltip, arrows move along
    assert float(tab.page.locator('#tooltip [data-field="logprob"]').text_content()) == pytest.approx(
        lp.token_logprobs[prompt_count], abs=6e-5)
    tab.page.keyboard.press("ArrowRight")
    assert tab.page.evaluate("document.activeElement.dataset.i") == str(prompt_count + 1)
    assert tab.page.get_attribute("#tooltip", "hidden") is None

    tab.fill(echo=False)   # without echo, text_offset still counts from the prompt's start
    assert tab.run() == "done"
    plain = greedy(api, prompt=SCALE_PROMPT, max_tokens=6, logprobs=3).choices[0]
    assert tab.page.locator(".completion .tok").all_text_contents() == plain.logprobs.tokens
    assert tab.text() == plain.text


def test_stop_aborts_a_long_generation_and_the_server_ends_it(tab, server):
    tab.fill(prompt="Once upon a time", max_tokens=900, temperature=0, logprobs=None)
    tab.fill(**{"bias-text": "<|im_end|>"})   # no early end: the end-of-text token is ruled out
    tab.page.click("#bias-lookup")
    tab.page.locator("#bias-rows tr").wait_for()
    tab.page.fill("#bias-rows .bias-value", "-100")
    before = scrape(server.base)
    run = int(tab.page.get_attribute("#output", "data-run") or 0)
    for stop in (lambda: tab.page.click("#stop"), lambda: tab.page.keyboard.press("Escape")):
        tab.page.click("#submit")
        until(tab.page, "(document.querySelector('.completion')?.textContent || '').length > 20")
        stop()
        run += 1
        tab.page.wait_for_selector(f'#output[data-run="{run}"][data-state="stopped"]')
        assert tab.stat("finish").startswith("stopped")
        assert tab.page.locator("#submit").is_enabled() and tab.page.locator("#stop").is_disabled()

    deadline = time.monotonic() + 30   # the server counts each once the disconnect has ended its request
    while scrape(server.base).get(COMPLETIONS_499, 0) < before.get(COMPLETIONS_499, 0) + 2:
        assert time.monotonic() < deadline, "the server never saw the disconnects"
        time.sleep(0.05)
    after = wait_until_idle(server.base)
    assert after[COMPLETIONS_499] - before.get(COMPLETIONS_499, 0) == 2
    assert after.get(COMPLETIONS_200, 0) == before.get(COMPLETIONS_200, 0)       # ended, not completed
    assert after["textcomplete_request_duration_seconds_count"] == before["textcomplete_request_duration_seconds_count"]
    generated = after["textcomplete_generation_tokens_total"] - before["textcomplete_generation_tokens_total"]
    assert 0 < generated < 900   # both together made fewer tokens than one asked for
    assert after["textcomplete_requests_running"] == 0 and after["textcomplete_kv_blocks_used"] == 0
    assert after["textcomplete_requests_in_flight"] == 0


def test_a_bad_setting_shows_the_servers_message_at_its_control(tab, server):
    r = httpx.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "Hi", "temperature": 5})
    expected = r.json()["error"]
    assert expected["param"] == "temperature"
    tab.fill(temperature=5)
    assert tab.run(lambda: tab.page.click("#submit")) == "error"
    assert tab.error_at("temperature") == expected["message"]
    assert tab.page.get_attribute("#temperature", "aria-invalid") == "true"
    assert tab.page.locator("#err-general").is_hidden()
    tab.fill(temperature=0, max_tokens=2)
    assert tab.run() == "done" and tab.page.locator("#err-temperature").is_hidden()


def test_a_wrong_key_shows_the_401_message_and_the_right_key_works(browser, server):
    t = Page(browser, server.base, key="sk-wrong-key-00000000")
    try:
        t.page.wait_for_selector('#err-api_key:has-text("Incorrect API key provided: sk-wr")')   # models list
        t.fill(max_tokens=2)
        assert t.run() == "error"
        message = t.error_at("api_key")
        assert message.startswith("Incorrect API key provided") and "sk-wrong-key-00000000" not in message
        t.set_key(KEY)
        t.page.locator("#err-api_key").wait_for(state="hidden")
        assert t.run() == "done" and t.text()
        t.page.reload()   # the key is kept in the browser's local storage
        t.page.wait_for_selector("body[data-ready=true]")
        assert t.page.input_value("#api-key") == KEY
        assert t.page.evaluate("localStorage.getItem('textcomplete.apiKey')") == KEY
    finally:
        t.close()


def code_for(tab: Page, language: str) -> str:
    """The code dialog's program in `language`, checked to be what its Copy button copies."""
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab.page.click("#view-code")
    tab.page.click(f'[role="tab"][data-lang="{language}"]')
    code = tab.page.locator("#code").text_content()
    tab.page.click("#code-copy")
    tab.page.wait_for_selector('#code-copied:has-text("Copied")')
    assert tab.page.evaluate("navigator.clipboard.readText()") == code
    tab.page.click("#code-close")
    return code


def test_view_code_python_snippet_runs_and_returns_the_same_text(tab, tmp_path):
    tab.fill(prompt="List three colours:", max_tokens=24, temperature=0, logprobs=1, seed=11)
    tab.fill(**{"stop-1": "\\n\\n", "presence_penalty": 0.5})
    assert tab.run() == "done"
    shown = tab.text()
    assert tab.stat("finish") == "stop"
    assert tab.page.get_attribute(".end-marker", "title").startswith("cut by a stop sequence")
    code = code_for(tab, "python")
    assert "from openai import OpenAI" in code and KEY not in code and '"\\n\\n"' in code
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENAI_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown + "\n"
    curl = code_for(tab, "curl")
    assert curl.startswith("curl -N ") and '"stop": [\n    "\\n\\n"\n  ]' in curl


def test_view_code_node_snippet_returns_the_same_text(tab, tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True,
                       timeout=300)
    tab.fill(prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=None)
    assert tab.run() == "done"
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    script = tmp_path / "snippet.mjs"
    script.write_text(code_for(tab, "node"))
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENAI_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout == tab.text() + "\n"


def choice_boxes(t: Page) -> list[dict]:
    return [t.page.locator(f'.choice[data-index="{i}"]').bounding_box() for i in range(2)]


def test_choices_side_by_side_and_screenshots_light_dark_phone(browser, server, tmp_path):
    for scheme, viewport in (("light", DESKTOP), ("dark", DESKTOP), ("phone", PHONE)):
        t = Page(browser, server.base, viewport=viewport, color_scheme="dark" if scheme == "dark" else "light")
        try:
            t.fill(prompt=SCALE_PROMPT, max_tokens=10, temperature=1, seed=3, n=2, logprobs=3)
            assert t.run() == "done"
            assert t.text(0) and t.text(1)
            first, second = choice_boxes(t)
            if scheme == "phone":   # stacked, and nothing wider than the screen
                assert second["y"] >= first["y"] + first["height"]
                assert t.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            else:
                assert first["y"] == second["y"] and second["x"] >= first["x"] + first["width"]
            assert (body_background(t) == "rgb(20, 22, 26)") == (scheme == "dark")
            t.page.locator(".completion .tok:not(.prompt)").nth(1).hover()
            t.page.locator("#tooltip").wait_for(state="visible")
            t.page.screenshot(path=str(tmp_path / f"playground-{scheme}.png"), full_page=scheme != "phone")
        finally:
            t.close()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "playground-dark.png", "playground-light.png", "playground-phone.png"]


def test_best_of_above_n_is_sent_whole_and_its_code_runs(tab, api, tmp_path):
    tab.fill(prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=None, best_of=2)
    sent = []
    tab.page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/completions") else None)
    assert tab.run() == "done"
    assert sent[-1]["best_of"] == 2 and "stream" not in sent[-1]   # best_of > n cannot stream
    expected = greedy(api, prompt="The capital of France is", max_tokens=6, best_of=2)
    assert tab.text() == expected.choices[0].text
    assert tab.stat("ttft") == "—" and tab.stat("completion_tokens") == str(expected.usage.completion_tokens)
    script = tmp_path / "snippet.py"
    script.write_text(code_for(tab, "python"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENAI_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout == tab.text() + "\n"


def tiny_server(tmp_path_factory, *extra: str) -> Server:
    """A server on a tiny random-weight model whose tokenizer has fill-in-the-middle tokens (it loads fast)."""
    from tests.api.test_fim import fim_model
    from tests.tiny_models import make_tiny_model
    root = tmp_path_factory.mktemp("tiny-fim")
    path, _ = fim_model(make_tiny_model("llama", root / "base"), root / "fim", "qwen")
    return Server("--model", str(path), "--served-model-name", "tiny-fim", "--kv-cache-memory", "16MiB",
                  "--max-model-len", "256", *extra)


def test_the_insertion_is_shown_between_prompt_and_suffix(browser, tmp_path_factory):
    s = tiny_server(tmp_path_factory)
    t = Page(browser, s.base, key=None)
    try:
        t.page.locator("#suffix-field").wait_for(state="visible")   # the model supports_suffix
        t.fill(prompt="w5 w6 w7", suffix="w9 w10", max_tokens=4, temperature=0, logprobs=2)
        assert t.run() == "done"
        expected = httpx.post(s.base + "/v1/completions", json={
            "model": "tiny-fim", "prompt": "w5 w6 w7", "suffix": "w9 w10", "max_tokens": 4, "temperature": 0,
            "logprobs": 2}).json()["choices"][0]
        assert t.text() == expected["text"]
        assert t.page.locator(".completion .tok").count() == len(expected["logprobs"]["tokens"])
        parts = t.page.locator('.choice[data-index="0"] .text > span:not([hidden])')
        assert [parts.nth(i).get_attribute("class") for i in range(parts.count())] == [
            "context prefix", "completion", "end-marker", "context suffix"]
        assert parts.nth(0).text_content() == "w5 w6 w7" and parts.nth(3).text_content() == "w9 w10"
        prompt, output, suffix = (t.page.locator(sel).bounding_box() for sel in ("#prompt", "#output", "#suffix"))
        assert prompt["y"] < output["y"] < suffix["y"]
    finally:
        t.close()
        s.stop()


def test_no_playground_flag_turns_the_page_off(tmp_path_factory):
    s = tiny_server(tmp_path_factory, "--no-playground")
    try:
        for path in ("/", "/playground", "/playground/app.js"):
            r = httpx.get(s.base + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
        assert httpx.get(s.base + "/v1/models").status_code == 200
    finally:
        s.stop()
