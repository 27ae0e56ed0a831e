"""The README's picture of ``dlpipe serve --ui`` (issue 18), taken for real: torchvision's ImageNet
MobileNetV2 (``../shared/weights``) exported with ``dlpipe export torchvision:mobilenet_v2``, served with the
page on 127.0.0.1, and a photograph from ``docs/photos`` classified in Debian's Chromium driven by
Playwright. Writes ``docs/ui.png`` and, beside the figures, ``bench/results/ui_screenshot.json`` (what the
page showed next to what the task endpoint answers for the same file). About a minute on 2 cores.

    python bench/ui_screenshot.py [--photo docs/photos/chelsea.jpg]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from common import write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"))
    p.add_argument("--photo", default=str(ROOT / "docs" / "photos" / "chelsea.jpg"))
    p.add_argument("--out", default=str(ROOT / "docs" / "ui.png"))
    p.add_argument("--width", type=int, default=900)
    args = p.parse_args()

    import httpx
    from playwright.sync_api import sync_playwright
    from serve_helpers import ServerThread

    from dlpipe.apps.serve import ModelSettings, Repository, create_app
    from dlpipe.export.onnx_export import export_torchvision

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("ui_screenshot: Chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as work:
        model = Path(work) / "mobilenet_v2" / "1" / "model.onnx"
        model.parent.mkdir(parents=True)
        export_torchvision("torchvision:mobilenet_v2", model, weights=args.weights)
        app = create_app(Repository.open([work], ModelSettings(device="cpu")), ui=True)
        with ServerThread(app) as server, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": args.width, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='true']")
            page.select_option("#model", "mobilenet_v2")
            page.set_input_files("#files", args.photo)
            page.click("#submit")
            page.wait_for_function("() => document.getElementById('latency').textContent.startsWith('Round trip')")
            shown = page.locator("#results").inner_text()
            page.screenshot(path=args.out, full_page=True)
            browser.close()
            with open(args.photo, "rb") as f:
                answer = httpx.post(f"{server.url}/v1/models/mobilenet_v2/predict",
                                    files={"file": (Path(args.photo).name, f.read())}, timeout=60).json()
    write_result("ui_screenshot", {"photo": str(Path(args.photo).relative_to(ROOT)), "screenshot": args.out,
                                   "page_text": shown, "api_answer": answer})
    print(f"wrote {args.out}\n{shown}")


if __name__ == "__main__":
    main()
