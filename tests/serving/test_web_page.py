"""The web page in a real headless Chromium (Selenium, the system's chromedriver): upload an
image, ask, see the model's answer; ask for an image, see it appear. Saves a screenshot to
``$DUALTOKEN_WEB_SCREENSHOT`` when that is set (docs/web_demo.png is made this way)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from live_server import serving

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("gradio")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs chromium and chromedriver on PATH (make setup installs them with apt-get when run as root)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(pipe):
    from mllm.serving.web import create_web_app

    with serving(create_web_app(pipe)) as server:
        yield server


def wait(browser, condition, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(condition)


def by_css(selector: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, selector


def test_upload_an_image_ask_and_see_the_answer_then_draw(browser, page, pipe, picture: Path) -> None:
    browser.get(page.url + "/")
    upload = wait(browser, lambda b: b.find_element(*by_css("#chat-image input[type=file]")))
    upload.send_keys(str(picture))
    wait(browser, lambda b: b.find_elements(*by_css("#chat-image img")))  # the preview of the upload
    question = browser.find_element(*by_css("#chat-question textarea"))
    question.send_keys("what colour is the circle?")
    browser.find_element(*by_css("#chat-ask")).click()
    expected = pipe.answer(str(picture), "what colour is the circle?", max_new_tokens=64)
    answer = wait(browser, lambda b: b.find_elements(*by_css("#chat-history [data-testid=bot]")))[-1]
    asked = browser.find_elements(*by_css("#chat-history [data-testid=user]"))
    assert [element.text.strip() for element in asked] == ["what colour is the circle?"]
    assert answer.text.strip() == expected

    if os.environ.get("DUALTOKEN_WEB_SCREENSHOT"):
        browser.save_screenshot(os.environ["DUALTOKEN_WEB_SCREENSHOT"])

    browser.find_elements(*by_css("button[role=tab]"))[1].click()  # the Draw tab
    prompt = wait(browser, lambda b: b.find_element(*by_css("#draw-prompt textarea")))
    prompt.send_keys("a large red circle")
    browser.find_element(*by_css("#draw-button")).click()
    image = wait(browser, lambda b: b.find_elements(*by_css("#draw-output img")))[0]
    wait(browser, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 32


def test_with_a_key_the_api_wants_it_and_the_page_asks_for_it(pipe) -> None:
    import httpx

    from mllm.serving.app import ServerConfig
    from mllm.serving.web import create_web_app

    with serving(create_web_app(pipe, ServerConfig(api_key="sesame"))) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        keyed = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sesame"})
        assert keyed.status_code == 200
        assert httpx.post(server.url + "/login", data={"username": "x", "password": "wrong"}).status_code == 400
        login = httpx.post(server.url + "/login", data={"username": "x", "password": "sesame"})
        assert login.status_code == 200 and login.json() == {"success": True}
