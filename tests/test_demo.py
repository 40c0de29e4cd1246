"""``grounding-demo``: the page, called over HTTP, gives what the Python API gives, writes only under ``--out``,
serves nothing else, refuses a file that is not an image; a headless browser runs it end to end."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
client_module = pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from grounding import demo  # noqa: E402
from grounding.predictor import Predictor, json_record  # noqa: E402

MODELS = {"detector": "image/synthetic.yaml", "gem": "gem/synthetic.yaml"}
CLASSES = "red circle, blue square"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1400")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


def results(out: Path) -> set[str]:
    """The demo's own files in ``out`` (Gradio's upload folder aside)."""
    return {path.name for path in out.iterdir() if path.name != demo.CACHE_FOLDER}


def ask(client: Client, image: Path, model: str, prompt: str = CLASSES, kind: str = "classes"):
    return client.predict(handle_file(str(image)), model, prompt, kind, "", 0.35, 0.25, 0, api_name="/predict")


@pytest.fixture(scope="module")
def image(synthetic_root) -> Path:
    return sorted((synthetic_root / "images" / "val").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo of both synthetic models, started from an empty working folder ``work`` with ``--out work/out``."""
    work = tmp_path_factory.mktemp("demo_cwd")
    out = work / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("GRADIO_TEMP_DIR", str(out / demo.CACHE_FOLDER))  # build_app sets it; restored after the module
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        app = demo.build_app(list(MODELS.values()), out=out, seed=0)
        port = free_port()
        demo.launch(app, port=port, block=False, quiet=True)
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", out=out.resolve(), work=work.resolve())
        finally:
            app.close(verbose=False)


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, download_files=False, verbose=False, analytics_enabled=False)


@pytest.mark.parametrize("method", ["gem", "detector"])
def test_the_page_gives_the_python_apis_record_and_writes_only_under_out(server, client, image, method):
    gradio_temp = Path(tempfile.gettempdir()) / "gradio"
    elsewhere = (files_under(gradio_temp), files_under(image.parent))
    before = results(server.out)

    drawing, record_file, payload = ask(client, image, MODELS[method])

    # the JSON file and the drawing, written under --out (Gradio serves copies from its folder inside --out)
    stem = Path(record_file["path"]).stem
    assert Path(drawing["path"]).name == f"{stem}.png" and stem.startswith(f"{image.stem}_{method}_")
    assert results(server.out) - before == {f"{stem}.json", f"{stem}.png"}
    assert json.loads((server.out / f"{stem}.json").read_text()) == payload
    assert all(Path(found["path"]).resolve().is_relative_to(server.out) for found in (drawing, record_file))

    # the same record from the Python API, computed here with a model of its own (built under the demo's seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        predictor = Predictor.load(MODELS[method])
    expected = predictor(image, classes=[name.strip() for name in CLASSES.split(",")])[0]
    got = dict(payload)
    assert (got.pop("model"), got.pop("method")) == (MODELS[method], method)
    pixels = got.pop("class_pixels", None)
    assert got == {**json_record(expected), "path": image.name}
    if method == "gem":
        labels = expected["label_map"]
        assert pixels == {name: int((labels == index).sum()) for index, name in enumerate(expected["classes"])}
        assert sum(pixels.values()) == labels.numel()
    else:
        assert pixels is None and len(got["boxes"]) == len(got["scores"]) == len(got["labels"]) > 0
    drawn = np.asarray(Image.open(server.out / f"{stem}.png").convert("RGB"))
    assert np.array_equal(drawn, np.asarray(predictor.draw(expected, image)))

    # nothing written outside --out: not in the working folder, Gradio's default folder or beside the image
    assert {path for path in server.work.iterdir()} == {server.out}
    assert (files_under(gradio_temp), files_under(image.parent)) == elsewhere
    assert not [path for path in server.out.iterdir() if path.name.endswith(".tmp")]


def test_only_the_out_folder_is_served(server, client, image):
    import httpx

    drawing, _, _ = ask(client, image, MODELS["gem"])
    assert httpx.get(drawing["url"], timeout=30).status_code == 200
    for outside in (image, Path(demo.__file__).resolve()):
        assert httpx.get(f"{server.url}gradio_api/file={outside}", timeout=30).status_code == 403, outside


def test_a_file_that_is_not_an_image_is_refused_by_name(server, client, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels\n")
    before = results(server.out)
    with pytest.raises(AppError, match=r"notes\.png is not an image"):
        ask(client, fake, MODELS["gem"])
    assert results(server.out) == before
    assert not list(server.out.rglob("notes.png"))  # the rejected upload is gone from Gradio's folder too


def test_errors_of_the_request_are_shown(server, client, image):
    with pytest.raises(AppError, match="takes classes"):
        ask(client, image, MODELS["gem"], "the red circle", kind="sentence")
    with pytest.raises(AppError, match="Type the class names"):
        ask(client, image, MODELS["gem"], "  ")


def test_the_command_line_is_local_and_offline_by_default():
    args = demo.build_parser().parse_args([])
    assert (args.host, args.share, args.out, args.model, args.port) == ("127.0.0.1", False, demo.DEFAULT_OUT, None, None)
    assert demo.DEFAULT_MODELS == (MODELS["detector"], MODELS["gem"])
    args = demo.build_parser().parse_args(["--model", "a.yaml", "--model", "RUN", "--share", "--port", "8000"])
    assert (args.model, args.share, args.port) == (["a.yaml", "RUN"], True, 8000)
    assert demo.parse_boxes("1,2,30,40; [5 6 7 8]") == [[1, 2, 30, 40], [5, 6, 7, 8]]
    assert demo.parse_boxes(" ") is None
    with pytest.raises(ValueError, match="box 2"):
        demo.parse_boxes("1,2,3,4; 1,2")


def test_a_browser_runs_the_page(server, image, tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    before = results(server.out)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url)
        upload = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(image))
        wait.until(lambda page: image.stem in page.find_element(By.ID, "image").text)  # the upload is listed
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea, #prompt input").send_keys(CLASSES)
        driver.find_element(By.ID, "submit").click()
        src = wait.until(lambda page: next((element.get_attribute("src") for element in
                                            page.find_elements(By.CSS_SELECTOR, "#drawing img")
                                            if element.get_attribute("src")), None))
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()
    assert src and "gradio_api/file=" in src
    assert (tmp_path / "page.png").stat().st_size > 0
    written = results(server.out) - before
    assert len(written) == 2 and {Path(name).suffix for name in written} == {".png", ".json"}
