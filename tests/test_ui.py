"""The web page of ``dlpipe serve --ui`` (issue 18) in a real browser: Playwright driving Debian's Chromium
against uvicorn on 127.0.0.1. What the page shows must equal what the task endpoint answers an HTTP client
for the same file; a bad file shows the server's message; the page fits a 375 px screen and asks nothing of
any other host. ``DLPIPE_UI_SCREENSHOT=PATH`` saves a full-page screenshot of a classifier's result there."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dlpipe.apps.serve import ModelSettings, Repository, create_app
from serve_helpers import ServerThread

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

pytestmark = pytest.mark.slow  # the session fixtures train and export a classifier and a segmenter (about 20 s)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 20_000
LATENCY = re.compile(r"^Round trip \d+\.\d ms · server \d+\.\d ms$")


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory) -> Path:
    """A detector trained for one short epoch on shapes scenes (seconds): its boxes are poor but real."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ui_rcnn")
    result = train(TrainConfig(model="rcnn", dataset="shapes-boxes", epochs=1, limit=160, test_limit=16, lr=2e-3,
                               out=str(out), progress=False, seed=0))
    export_checkpoint(result["best"], out / "rcnn.onnx")
    return out / "rcnn.onnx"


@pytest.fixture(scope="module")
def server(shapes_onnx, fcn_onnx, detector_onnx, tmp_path_factory):
    """The classifier, the segmenter and the detector in a Triton-layout repository, served with the page."""
    root = tmp_path_factory.mktemp("ui_repo")
    for name, source in (("shapes", shapes_onnx), ("fcn", fcn_onnx), ("boxes", detector_onnx)):
        (root / name / "1").mkdir(parents=True)
        shutil.copyfile(source, root / name / "1" / "model.onnx")
    app = create_app(Repository.open([root], ModelSettings(device="cpu")), ui=True)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it as root)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Visit:
    """A page on the server with every request it made and every script error it hit."""

    def __init__(self, browser, url: str, width: int = 1000):
        self.page = browser.new_page(viewport={"width": width, "height": 800})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # a 4xx/5xx answer is logged as "Failed to load resource"; the page shows those itself
        self.page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                     and self.errors.append(m.text))
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-ready='true']")

    def predict(self, model: str, files, options: dict[str, str] | None = None) -> None:
        """Choose ``model``, the ``files`` and the task's ``options`` (by name), submit and wait for the answer."""
        self.page.select_option("#model", model)
        self.page.set_input_files("#files", files)
        for name, value in (options or {}).items():
            self.page.fill(f"#option-{name}", value)
        self.page.click("#submit")
        self.page.wait_for_function("() => document.getElementById('latency').textContent.startsWith('Round trip')")

    def open_card(self) -> None:
        """Open the model card and wait for its text or its error."""
        self.page.click("#card summary")
        self.page.wait_for_function("() => { const s = document.getElementById('card-status').textContent;"
                                    " return document.getElementById('card-text').textContent.length > 0"
                                    " || (s.length > 0 && s !== 'Loading…'); }")


@pytest.fixture()
def visit(browser, server):
    opened = []

    def open_page(width: int = 1000) -> Visit:
        opened.append(Visit(browser, server.url, width))
        return opened[-1]

    yield open_page
    for v in opened:
        v.page.close()


def _png(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _scene(path: Path, size: tuple[int, int], shapes: int, index: int) -> Path:
    """A picture of the shapes world the models were trained on (``shapes`` shapes on a background)."""
    from dlpipe.training.shapes import ShapesWorld

    world = ShapesWorld(seed=123, image_size=size, shapes_per_scene=(shapes, shapes))
    Image.fromarray(world.render(world.scene(index))[0]).save(path)
    return path


def _predict(server, model: str, name: str, data: bytes, params: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{model}/predict", files=[("files", (name, data, "image/png"))],
                      params=params, timeout=30)


def _texts(page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_the_page_lists_the_served_models(visit, server):
    listing = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert [m["name"] for m in listing["models"]] == ["boxes", "fcn", "shapes"]
    shapes = next(m for m in listing["models"] if m["name"] == "shapes")
    assert shapes["task"] == "classification" and shapes["request"] == "images" and shapes["input_size"] == [32, 32]
    assert shapes["label_count"] == len(shapes["labels"]) > 1
    v = visit()
    options = v.page.locator("#model option")
    assert options.evaluate_all("os => os.map(o => o.value)") == ["boxes", "fcn", "shapes"]
    assert _texts(v.page, "#model option") == ["boxes (detection)", "fcn (segmentation)", "shapes (classification)"]
    assert "task detection" in v.page.inner_text("#model-info")
    assert v.page.is_visible("#files") and v.page.is_visible("label[for='files']")
    # the card: the Markdown the API answers, shown as it is
    card = httpx.get(f"{server.url}/v1/models/boxes/card", timeout=30)
    assert card.status_code == 200 and card.text.startswith("---\n") and "pipeline_tag: object-detection" in card.text
    v.open_card()
    assert v.page.text_content("#card-text") == card.text and v.page.text_content("#card-status") == ""
    assert httpx.get(f"{server.url}/v1/models/nope/card", timeout=10).status_code == 404
    assert v.errors == []


def test_classification_shows_what_the_api_answers(visit, server, tmp_path):
    path = _scene(tmp_path / "shape.png", (32, 32), 1, index=3)
    v = visit()
    v.predict("shapes", str(path))
    v.page.wait_for_selector(".result .bars li")
    top_k = int(v.page.input_value("#option-top_k"))
    answer = _predict(server, "shapes", path.name, path.read_bytes(), {"top_k": top_k})
    assert answer.status_code == 200, answer.text
    row = answer.json()["results"][0]
    assert v.page.inner_text(".result .top-label") == row["label"]
    assert v.page.inner_text(".result .top-score") == f"{row['score']:.3f}"
    assert _texts(v.page, ".result .bars .label") == [t["label"] for t in row["top_k"]]
    assert _texts(v.page, ".result .bars .score") == [f"{t['score']:.3f}" for t in row["top_k"]]
    assert v.page.inner_text(".result h2") == "shape.png"
    assert v.page.get_attribute("#previews img", "alt") == "Preview of shape.png"
    assert LATENCY.match(v.page.inner_text("#latency")), v.page.inner_text("#latency")
    assert v.page.is_hidden("#alert")
    if os.environ.get("DLPIPE_UI_SCREENSHOT"):
        v.page.screenshot(path=os.environ["DLPIPE_UI_SCREENSHOT"], full_page=True)
    assert v.errors == []


def test_segmentation_shows_the_overlay_and_the_class_shares(visit, server, tmp_path):
    path = _scene(tmp_path / "scene.png", (48, 64), 3, index=4)
    v = visit()
    v.predict("fcn", str(path))
    v.page.wait_for_function("() => { const i = document.querySelector('.result img.picture');"
                             " return i && i.complete && i.naturalWidth > 0; }")
    answer = _predict(server, "fcn", path.name, path.read_bytes(), {"overlay": "true"})
    assert answer.status_code == 200, answer.text
    row = answer.json()["results"][0]
    overlay = v.page.locator(".result img.picture")
    assert overlay.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 48]
    assert overlay.get_attribute("src") == "data:image/png;base64," + row["overlay_png"]
    assert overlay.get_attribute("alt") == "Segmentation overlay of scene.png"
    present = {label: share for label, share in row["shares"].items() if share > 0}
    assert _texts(v.page, ".legend .label") == list(present)
    assert _texts(v.page, ".legend .score") == [f"{100 * s:.1f}%" if s >= 0.001 else "<0.1%" for s in present.values()]
    swatches = v.page.locator(".legend .swatch").evaluate_all("s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert len(set(swatches)) == len(present)  # one colour per class
    assert base64.b64decode(row["overlay_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert v.errors == []


def test_detection_draws_the_boxes_the_api_finds(visit, server, tmp_path):
    path = _scene(tmp_path / "boxes.png", (96, 128), 3, index=1)
    threshold = "0.05"  # the detector trained for seconds is unsure of everything
    answer = _predict(server, "boxes", path.name, path.read_bytes(), {"threshold": threshold})
    assert answer.status_code == 200, answer.text
    found = answer.json()["results"][0]["detections"]
    assert found, "the test needs boxes to compare"
    v = visit()
    v.predict("boxes", str(path), {"threshold": threshold})
    canvas = v.page.locator(".result canvas[role='img']")
    v.page.wait_for_selector(".result canvas[data-drawn]")
    assert canvas.get_attribute("data-drawn") == str(len(found))
    assert canvas.get_attribute("aria-label").startswith(f"{len(found)} objects found in boxes.png")
    assert _texts(v.page, ".result tbody td:first-child") == [d["label"] for d in found]
    assert [float(t) for t in _texts(v.page, ".result tbody td:nth-child(2)")] == [d["score"] for d in found]
    boxes = [[float(x) for x in t.split(", ")] for t in _texts(v.page, ".result tbody td:nth-child(3)")]
    assert boxes == [d["box"] for d in found]
    # the image is drawn under the boxes: the canvas is not blank
    assert canvas.evaluate("c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                           " return d.some((v, i) => i % 4 !== 3 && v > 0); }")
    assert v.errors == []


def test_a_bad_file_shows_the_servers_message_and_the_page_carries_on(visit, server, tmp_path):
    junk = b"this is text, not a picture"
    answer = _predict(server, "shapes", "x.png", junk, {"top_k": 5})
    assert answer.status_code == 400 and "x.png" in answer.json()["error"]
    v = visit()
    v.predict("shapes", {"name": "x.png", "mimeType": "image/png", "buffer": junk})
    alert = v.page.locator("#alert[role='alert']")
    alert.wait_for(state="visible")
    assert alert.inner_text() == answer.json()["error"]
    assert v.page.locator(".result").count() == 0
    # no file at all: the page says so itself
    v.page.set_input_files("#files", [])
    v.page.click("#submit")
    v.page.wait_for_function("() => document.getElementById('alert').textContent.startsWith('Choose')")
    # and a good file afterwards is answered, the alert gone
    v.predict("shapes", str(_png(tmp_path / "good.png", 32, 32, seed=5)))
    v.page.wait_for_selector(".result .top-label")
    assert v.page.is_hidden("#alert")
    assert v.errors == []


def test_the_page_fits_a_narrow_screen(visit, tmp_path):
    v = visit(width=375)
    width = "document.documentElement.scrollWidth"
    assert v.page.evaluate(width) <= 375
    v.predict("shapes", str(_png(tmp_path / "a-rather-long-file-name-without-any-spaces-in-it.png", 300, 500, 6)))
    v.page.wait_for_selector(".result .bars li")
    assert v.page.evaluate(width) <= 375
    v.predict("fcn", str(_png(tmp_path / "wide.png", 200, 1200, seed=7)))
    v.page.wait_for_selector(".result .legend li")
    v.open_card()
    assert v.page.evaluate(width) <= 375
    assert v.errors == []


def test_the_page_asks_nothing_of_other_hosts(visit, server, tmp_path):
    v = visit()
    v.predict("shapes", str(_png(tmp_path / "one.png", 32, 32, seed=8)))
    v.page.wait_for_selector(".result .top-label")
    v.open_card()
    asked = [u for u in v.requests if not u.startswith(("data:", "blob:"))]
    assert {f"{server.url}/", f"{server.url}/ui/app.js", f"{server.url}/ui/app.css",
            f"{server.url}/v1/models"} <= set(asked), asked
    assert all(u.startswith(server.url + "/") for u in asked), asked
    page = httpx.get(server.url + "/", timeout=10)
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert v.errors == []


def test_the_page_is_off_unless_asked_for(shapes_onnx):
    with ServerThread(create_app(Repository.open([shapes_onnx], ModelSettings(device="cpu")))) as plain:
        assert httpx.get(plain.url + "/", timeout=10).status_code == 404
        assert httpx.get(plain.url + "/v1/models", timeout=10).status_code in (404, 405)
        assert httpx.get(plain.url + "/ui/app.js", timeout=10).status_code == 404


def test_the_model_card_shows_as_plain_text(visit, server, monkeypatch):
    import dlpipe.apps.card
    from dlpipe.runtime.errors import ModelFileError

    markdown = "---\nlicense: apache-2.0\n---\n# fcn\n\n<b>not bold</b> " + "wide" * 100 + "\n| a | b |\n"
    monkeypatch.setattr(dlpipe.apps.card, "model_card", lambda path: markdown)
    v = visit(width=375)
    v.open_card()
    assert v.page.text_content("#card-text") == markdown
    assert v.page.locator("#card-text b").count() == 0  # Markdown shown as text, never parsed as HTML
    assert v.page.evaluate("document.documentElement.scrollWidth") <= 375

    def no_card(path):
        raise ModelFileError(f"'{path}' has no metadata")

    monkeypatch.setattr(dlpipe.apps.card, "model_card", no_card)
    answer = httpx.get(f"{server.url}/v1/models/shapes/card", timeout=10)
    assert answer.status_code == 404 and "has no card" in answer.json()["error"]
    v.page.select_option("#model", "shapes")  # an open card follows the chosen model
    v.page.wait_for_function("() => document.getElementById('card-status').textContent.includes('has no card')")
    assert v.page.text_content("#card-status") == answer.json()["error"]
    assert v.page.text_content("#card-text") == ""
    assert v.errors == []


@pytest.fixture(scope="module")
def generator_server(tmp_path_factory, data_dir, mnist_checkpoint):
    """A tiny class-conditional DCGAN (one short epoch; its digits are poor but real) and an unconditional
    classifier, served with the page."""
    from dlpipe.export.onnx_export import export_checkpoint
    from dlpipe.training import gan

    out = tmp_path_factory.mktemp("ui_gan")
    run = gan.train(gan.GANConfig(model="cdcgan", classifier=mnist_checkpoint, data_dir=data_dir, out=str(out),
                                  limit=200, epochs=1, batch_size=32, quality_samples=50, grid=16,
                                  model_args={"latent_size": 16, "width": 8}, progress=False, threads=1))
    (out / "repo" / "digits" / "1").mkdir(parents=True)
    export_checkpoint(run["best"], out / "repo" / "digits" / "1" / "model.onnx")
    app = create_app(Repository.open([out / "repo"], ModelSettings(device="cpu")), ui=True)
    with ServerThread(app) as running:
        yield running


def test_a_conditional_generator_asks_for_a_class_and_shows_the_apis_grid(browser, generator_server):
    listed = httpx.get(f"{generator_server.url}/v1/models", timeout=10).json()["models"]
    assert [(m["name"], m["request"], m["conditional"]) for m in listed] == [("digits", "none", True)]
    v = Visit(browser, generator_server.url)
    try:
        assert v.page.input_value("#option-class") == listed[0]["labels"][0]  # a class is filled in
        v.page.fill("#option-n", "6")
        v.page.fill("#option-seed", "3")
        v.page.fill("#option-class", "7")
        v.page.click("#submit")
        v.page.wait_for_function("() => document.getElementById('latency').textContent.startsWith('Round trip')")
        shown = v.page.get_attribute(".result img", "src")
        answer = httpx.post(f"{generator_server.url}/v1/models/digits/predict",
                            params={"n": 6, "seed": 3, "class": "7", "columns": 8}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert shown == "data:image/png;base64," + answer.json()["results"][0]["grid_png"]
        assert v.page.is_hidden("#alert") and v.errors == []
    finally:
        v.page.close()
