"""`vtprune demo`: the engine (answers, budgets, bad input), the Gradio app through gradio_client's named
endpoint, and the page in a real headless Chromium driven by Playwright.

The app tests launch the app on 127.0.0.1 with a tiny random LLaVA (the UI does not care about the
weights). The browser test needs Debian's chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
and the playwright package (the dev extra); without them it is skipped, saying which is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtprune.demo import DemoEngine, DemoInputError, load_image, parse_keep
from vtprune.demo import engine as engine_mod
from vtprune.loading import load_model

CHROMIUM = os.environ.get("VTPRUNE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def engine():
    model, processor = load_model("tiny-llava")
    return DemoEngine(model, processor, name="tiny-llava", max_new_tokens=3, repeats=1)


def _png(path: Path, w=300, h=200, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ---- the engine -----------------------------------------------------------------------------------
def test_keep_all_answers_like_the_unpruned_model_and_draws_every_token(engine, tmp_path):
    ans = engine.ask(str(_png(tmp_path / "a.png")), "What is here?", "fastv", "1.0")
    assert ans.pruned == ans.unpruned and ans.kept == ans.total == 576
    assert ans.overlay.size == (336, 336)
    assert "576 of 576" in ans.summary() and "prefill" in ans.summary()


def test_a_budget_prunes_and_the_overlay_shows_it(engine, tmp_path):
    path = str(_png(tmp_path / "a.png"))
    ans = engine.ask(path, "What is here?", "cls", "64", heatmap=False)
    assert ans.kept == 64 and ans.stage == "before the LLM"
    dark = np.asarray(ans.overlay).reshape(24, 14, 24, 14, 3).mean(axis=(1, 3, 4))
    bright = np.asarray(engine.ask(path, "What is here?", "cls", "1.0").overlay).reshape(24, 14, 24, 14, 3).mean(
        axis=(1, 3, 4))
    assert int((dark < 0.5 * bright).sum()) == 576 - 64  # exactly the pruned cells are darkened
    heat = engine.ask(path, "What is here?", "fastv", "0.25", heatmap=True)
    assert heat.kept == 144 and heat.stage == "after LLM layer 2" and not heat.notes
    zipped = engine.ask(path, "What is here?", "visionzip", "32", heatmap=True)
    assert any("heatmap is not available" in n for n in zipped.notes)


@pytest.mark.parametrize(("value", "expect"), [("7", 7), (7, 7), (7.0, 7), ("0.25", 0.25), (0.5, 0.5),
                                               ("1", 1), ("1.0", 1.0), (" 12 ", 12)])
def test_parse_keep_reads_counts_and_fractions(value, expect):
    got = parse_keep(value, 64)
    assert got == expect and type(got) is type(expect)


@pytest.mark.parametrize(("value", "message"), [
    ("", "no budget"), (None, "no budget"), ("abc", "not a number"), ("0", "at least one token"),
    ("-3", "at least one token"), ("65", "only 64 visual tokens"), ("1.5", r"fraction lies in \(0, 1\]"),
    (0.0, r"fraction lies in \(0, 1\]"), (True, "no budget"),
])
def test_parse_keep_refuses_out_of_range_budgets(value, message):
    with pytest.raises(DemoInputError, match=message):
        parse_keep(value, 64)


def test_bad_requests_raise_messages_for_the_ui(engine, tmp_path):
    img = str(_png(tmp_path / "a.png"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        ((img, "   ", "fastv", "7"), "question is empty"),
        ((img, "x" * 600, "fastv", "7"), "600 characters"),
        ((None, "What?", "fastv", "7"), "no image"),
        ((str(text), "What?", "fastv", "7"), "notes.txt is not an image"),
        ((img, "What?", "nope", "7"), "nope cannot run here"),
        ((img, "What?", "", "7"), "no method"),
        ((img, "What?", "fastv", "9999"), "only 576 visual tokens"),
        ((img, "What is <image> here?", "fastv", "7"), "contains <image>, the model's image placeholder"),
    ]
    for args, message in cases:
        with pytest.raises(DemoInputError, match=message):
            engine.ask(*args)


def test_huge_images_are_downscaled_or_refused(tmp_path, monkeypatch):
    big = _png(tmp_path / "big.png", w=2048, h=1024)
    img, notes = load_image(str(big))
    assert img.size == (1024, 512) and "downscaled to 1024 x 512" in notes[0]
    monkeypatch.setattr(engine_mod, "MAX_PIXELS", 1_000_000)
    with pytest.raises(DemoInputError, match="2048 x 1024 pixels, over the demo's limit"):
        load_image(str(big))


def test_methods_offered_are_the_ones_that_configure(engine):
    offered = engine.methods()
    assert {"fastv", "cls", "random", "visionzip"} <= set(offered)
    assert "debias" not in offered  # a wrapper alone needs a host


# ---- the app over HTTP --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(engine, tmp_path_factory):
    pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'vtprune[demo]')")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vtprune.demo import build_demo
    from vtprune.demo.app import example_rows

    app = build_demo(engine, examples=example_rows(2, tmp_path_factory.mktemp("examples")))
    app.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
               show_error=False)
    try:
        yield app.local_url
    finally:
        app.close()


def test_named_endpoint_answers_through_gradio_client(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    assert "/ask" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    pruned, unpruned, overlay, info = client.predict(handle_file(str(_png(tmp_path / "a.png"))), "What is here?",
                                                     "fastv", "1.0", False, api_name="/ask")
    assert pruned == unpruned and "576 of 576" in info
    assert Image.open(overlay).size == (336, 336)
    pruned, _, _, info = client.predict(handle_file(str(_png(tmp_path / "b.png"))), "What is here?", "cls", "36",
                                        True, api_name="/ask")
    assert "36 of 576" in info


def test_concurrent_requests_are_queued_and_all_answered(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    image = handle_file(str(_png(tmp_path / "a.png")))
    jobs = [client.submit(image, "What is here?", method, keep, False, api_name="/ask")
            for method, keep in [("fastv", "16"), ("random", "32"), ("debias+fastv", "48")]]
    infos = [job.result(timeout=120)[3] for job in jobs]
    assert ["16 of 576" in infos[0], "32 of 576" in infos[1], "48 of 576" in infos[2]] == [True] * 3


def test_bad_input_over_http_is_a_message_not_a_stack_trace(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="question is empty") as err:
        client.predict(handle_file(str(_png(tmp_path / "a.png"))), "", "fastv", "7", False, api_name="/ask")
    assert "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="out of range"):
        client.predict(handle_file(str(_png(tmp_path / "a.png"))), "Why?", "fastv", "100000", False,
                       api_name="/ask")


# ---- the page in a real browser -----------------------------------------------------------------------
def _browser():
    sync = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    return sync


def test_browser_uploads_asks_and_sees_answers_and_overlay(app_url, tmp_path):
    sync = _browser()
    image = _png(tmp_path / "upload.png", w=336, h=336, seed=3)
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app_url, wait_until="networkidle")
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#image img").first.wait_for(timeout=30_000)  # the upload is shown
            page.locator("#question textarea").fill("What is here?")
            page.locator("#keep textarea").fill("64")
            page.locator("#ask").click()
            pruned = page.locator("#pruned-answer textarea")
            page.wait_for_function("() => document.querySelector('#info') && "
                                   "document.querySelector('#info').innerText.includes('64 of 576')", timeout=60_000)
            unpruned = page.locator("#unpruned-answer textarea")
            assert pruned.input_value() != "" and unpruned.input_value() != ""
            overlay = page.locator("#overlay img").first
            overlay.wait_for(timeout=30_000)
            assert overlay.evaluate("img => img.naturalWidth") == 336
            shot = os.environ.get("VTPRUNE_DEMO_SCREENSHOT") or str(tmp_path / "demo.png")
            page.screenshot(path=shot, full_page=True)
            assert Path(shot).stat().st_size > 10_000
            # bad input: an empty question shows a message in the page
            page.locator("#question textarea").fill("")
            page.locator("#ask").click()
            page.get_by_text("the question is empty").first.wait_for(timeout=30_000)
        finally:
            browser.close()


def test_cli_demo_loads_the_model_and_launches_where_asked(monkeypatch):
    gr = pytest.importorskip("gradio")
    from vtprune.cli import main

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw, title=self.title))
    assert main(["demo", "--model", "tiny-qwen2-vl", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert seen == {"server_name": "0.0.0.0", "server_port": 7999, "share": False,
                    "title": "vtprune: what visual-token pruning keeps"}
    assert main(["demo", "--model", "no-such-model"]) == 2  # an input error: one line, exit 2
