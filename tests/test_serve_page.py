"""The page at / in headless Chromium (Debian's `chromium` and `chromium-driver`, which
scripts/setup installs): a streamed chat answer appears for an instruction run, label bars for a
classifier. Screenshots are saved in the test's tmp dir; with LLMFT_DOCS_SCREENSHOT=1 the
classifier's also replaces docs/serve-page.png."""

from __future__ import annotations

import os
import shutil

import pytest

from llmft.pipelines.classification import predict
from llmft.pipelines.instruction import answer, load_chat_model
from llmft.serving import create_app, load_served
from tests.helpers import ROOT
from tests.test_serve import SPAM, serving, train_runs

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (scripts/setup installs them)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_runs(tmp_path_factory.getbasetemp() / "serve-runs")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-proxy-server", "--window-size=900,470"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(browser, css, count=1):
    """The elements matching `css`, once there are `count` of them (at most 30 s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(b):
        elements = b.find_elements(By.CSS_SELECTOR, css)
        return elements if len(elements) >= count else False

    return WebDriverWait(browser, 30).until(found)


def test_chat_answer_streams_into_the_page(runs, browser, tmp_path):
    from selenium.webdriver.common.by import By

    model, tokenizer, style = load_chat_model(str(runs.sft), "cpu")
    instruction = "Identify the climax in 'Romeo and Juliet'."
    expected = answer(model, tokenizer, style, [{"instruction": instruction, "input": ""}], max_new_tokens=48)[0]
    with serving(create_app(load_served(str(runs.sft), device="cpu"))) as url:
        browser.get(url + "/")
        wait_for(browser, "#chat:not([hidden])")
        assert browser.find_element(By.ID, "model-name").text == "sft · chat"
        browser.find_element(By.ID, "prompt").send_keys(instruction)
        browser.find_element(By.ID, "send").click()
        reply = wait_for(browser, ".assistant.done")[0]
        browser.save_screenshot(str(tmp_path / "serve-page-chat.png"))
    assert "error" not in reply.get_attribute("class")
    assert reply.text == expected.strip()  # the page shows what the API streams
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".user")] == [instruction]


def test_classifier_page_shows_label_bars(runs, browser, tmp_path):
    from selenium.webdriver.common.by import By

    (label, probability), = predict(runs.spam, [SPAM], device="cpu")
    with serving(create_app(load_served(str(runs.spam), device="cpu"))) as url:
        browser.get(url + "/")
        wait_for(browser, "#classify:not([hidden])")
        browser.find_element(By.ID, "text").send_keys(SPAM)
        browser.find_element(By.ID, "classify-button").click()
        rows = wait_for(browser, ".label-row", 2)
        shot = tmp_path / "serve-page.png"
        browser.save_screenshot(str(shot))
        names = [r.find_element(By.CLASS_NAME, "label-name").text for r in rows]
        scores = [float(r.find_element(By.CLASS_NAME, "score").text.rstrip("%")) for r in rows]
        widths = [r.find_element(By.CLASS_NAME, "fill").value_of_css_property("width") for r in rows]
    assert names[0] == label and sorted(names) == ["ham", "spam"]
    assert scores[0] == pytest.approx(100 * probability, abs=0.05) and sum(scores) == pytest.approx(100, abs=0.2)
    assert float(widths[0].removesuffix("px")) > float(widths[1].removesuffix("px"))  # the bars are drawn
    if os.environ.get("LLMFT_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "serve-page.png")
