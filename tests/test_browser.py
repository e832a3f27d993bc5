"""The page of `vlp serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium,
driven by Playwright; no browser download) loads it from a live server, searches by text and
sees the described image first, uploads an image and sees its caption, labels and answer, and
saves a screenshot (docs/images/serve.png when VLP_UPDATE_SCREENSHOT=1)."""

import json
import os
import re
import shutil
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.sync_api import expect, sync_playwright
from test_eval_any_data import COLOURS
from test_serve import ServeOracle, live_server

from vlp.apps.index import Index, build
from vlp.apps.serve import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHAPES = {"circle": "ellipse", "square": "rectangle"}
SCREENSHOT = Path(__file__).parent.parent / "docs" / "images" / "serve.png"


def picture(colour: str, shape: str, size: int = 64) -> Image.Image:
    """A light `shape` on a `colour` ground: the ground's channel still dominates (ColourOracle)."""
    img = Image.new("RGB", (size, size), COLOURS[colour])
    getattr(ImageDraw.Draw(img), SHAPES[shape])((16, 16, 48, 48), fill=(235, 235, 235))
    return img


def captioned_dataset(root: Path) -> Path:
    """A JSON-lines data set of six pictures with captions (the index keeps them)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            picture(colour, shape).save(root / "images" / f"{colour}-{shape}.png")
            caption = f"a white {shape} on a {colour} ground"
            lines.append(json.dumps({"image": f"images/{colour}-{shape}.png", "caption": caption}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def test_search_and_upload_in_a_real_browser(tmp_path):
    model = ServeOracle()
    build(model, [captioned_dataset(tmp_path / "data")], tmp_path / "index", "oracle", workers=0)
    upload = tmp_path / "query.png"
    picture("blue", "circle").save(upload)
    with live_server(create_app(Index.open(tmp_path / "index", model))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(10_000)
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.locator("#about")).to_contain_text("6 images")

            page.fill("#labels", "red, green, blue")  # the oracle knows colour words only
            page.set_input_files("#file", str(upload))
            expect(page.locator("#caption")).to_have_text("a blue square")
            expect(page.locator("#labels-out li").first).to_contain_text("blue")
            expect(page.locator("#results-title")).to_have_text("Images like yours")
            expect(page.locator("#results figure").first).to_have_attribute("data-path", re.compile("blue-"))
            page.fill("#question", "what colour is the ground?")
            page.click("#ask-form button")
            expect(page.locator("#answer")).to_have_text("blue")

            page.fill("#query", "something green")
            page.press("#query", "Enter")
            expect(page.locator("#results-title")).to_contain_text("something green")
            first = page.locator("#results figure").first
            expect(first).to_contain_text("green ground")
            expect(first).to_have_attribute("data-path", re.compile("green-"))
            expect(first.locator(".score")).to_have_text("1.000")
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)"
            )
            assert not errors, errors
            page.screenshot(path=str(tmp_path / "serve.png"))
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    if os.environ.get("VLP_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "serve.png", SCREENSHOT)
