"""The explorer in a real browser: Voilà serves it on localhost, Playwright drives Debian's Chromium.

`.ci/run` installs Chromium (`apt-get install chromium`); elsewhere the test is skipped when
/usr/bin/chromium is absent. Browser downloads are not needed: Playwright launches that binary.
"""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

CHROMIUM = Path("/usr/bin/chromium")
APP = """
from elite_tutorial import load_components
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.explorer import AttentionExplorer
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_views

pipe = ELITEPipeline(load_components("toy"), GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
explorer = AttentionExplorer(pipe, {c.name: concept_views(c)[0] for c in CONCEPTS[:3]})
explorer.run()
explorer
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_explorer(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(APP)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "explorer.ipynb")
    port = free_port()
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "voila", "explorer.ipynb", f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
         "--ServerApp.allow_root=True"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ELITE_PRESET": "toy"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_explorer_renders_and_the_word_selector_changes_the_image(served_explorer):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(served_explorer, timeout=180_000)
            image = page.locator("img.widget-image").first
            image.wait_for(timeout=180_000)
            page.wait_for_function("() => (document.querySelector('img.widget-image') || {}).src?.startsWith('blob:')"
                                   " || (document.querySelector('img.widget-image') || {}).src?.startsWith('data:')",
                                   timeout=60_000)
            shown = page.evaluate("() => document.querySelector('img.widget-image').src")
            word = page.locator(".widget-dropdown").filter(has=page.locator("label", has_text=re.compile("^word$")))
            assert word.locator("select").input_value() == "w0"
            word.locator("select").select_option(label="left")
            page.wait_for_function("(before) => document.querySelector('img.widget-image').src !== before",
                                   arg=shown, timeout=60_000)
            assert page.evaluate("() => document.querySelector('img.widget-image').naturalWidth") > 0
        finally:
            browser.close()
