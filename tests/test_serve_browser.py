"""The chat page in a real headless browser: Debian's chromium driven by playwright.

Skipped where playwright or chromium is missing (CI installs both: see .ci/run). Set
TINYGRAD_LLM_SCREENSHOT=path.png to keep a screenshot of the page after a reply.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from tinygrad_llm import backend  # noqa: E402
from tinygrad_llm.finetune.instruction import save_instruct_model  # noqa: E402
from tinygrad_llm.models.gpt import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.serve import create_app, running_server  # noqa: E402
from tinygrad_llm.tokenizer import GPT2Tokenizer  # noqa: E402

CHROMIUM = os.environ.get("TINYGRAD_LLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
                                reason=f"no chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def chat_url(tmp_path_factory):
    backend.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2, n_embd=16,
                          tie_weights=False))
    folder = tmp_path_factory.mktemp("browser") / "sft"
    save_instruct_model(folder, model, GPT2Tokenizer(), "alpaca")
    app = create_app(folder, model_name="tiny-chat")
    with running_server(app) as url:
        yield app, url


@pytest.fixture
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 700})
        finally:
            browser.close()


def test_chat_page_streams_a_reply_and_keeps_the_conversation(chat_url, page, tmp_path):
    page.goto(chat_url[1] + "/")
    sync_api.expect(page.locator("#model-name")).to_contain_text("tiny-chat", timeout=10_000)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.fill("#input", "Say yes.")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant .content").first
    sync_api.expect(reply).not_to_have_text("", timeout=10_000)  # streamed text arrived
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=20_000)  # the reply ended
    first = reply.inner_text()
    assert first and "error" not in first

    page.fill("#input", "And again?")
    page.click("#send")
    sync_api.expect(page.locator("#send")).to_be_enabled(timeout=20_000)
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.assistant").count() == 2
    assert reply.inner_text() == first  # the first reply is kept

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    if os.environ.get("TINYGRAD_LLM_SCREENSHOT"):
        page.screenshot(path=os.environ["TINYGRAD_LLM_SCREENSHOT"], full_page=True)


def test_stop_button_ends_a_reply(chat_url, page, monkeypatch):
    app, url = chat_url
    worker = app.state.worker
    step = worker._step

    def slow_step():  # 50 ms a token, so the reply is still running when Stop is clicked
        time.sleep(0.05)
        step()

    monkeypatch.setattr(worker, "_step", slow_step)
    page.goto(url + "/")
    page.fill("#max-tokens", "120")
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    reply = page.locator(".msg.assistant .content").first
    sync_api.expect(reply).not_to_have_text("", timeout=10_000)
    page.click("#stop")
    sync_api.expect(reply).to_contain_text("[stopped]", timeout=5_000)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    deadline = time.monotonic() + 5
    while worker.active and time.monotonic() < deadline:  # the server dropped the sequence
        time.sleep(0.02)
    assert not worker.active
