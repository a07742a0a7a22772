"""The README's picture of the demo page: start `sample.py`'s page for a checkpoint on a free loopback port, open it
in the system's headless Chromium (Selenium, no browser download), draw a batch and save a screenshot.

    python experiments/demo_page/screenshot.py CKPT experiments/demo_page/page.png [--batch 8] [--steps 50]
"""

from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

from hydra import compose, initialize_config_dir
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from lightdiff.demo import build_app

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("sample", [f"ckpt={args.ckpt.resolve()}", "demo.enabled=true", f"steps={args.steps}"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(cfg)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 300)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Loaded"))
        batch = driver.find_element(By.CSS_SELECTOR, "#batch input[type=number]")
        batch.clear()
        batch.send_keys(str(args.batch))
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) >= args.batch)
        wait.until(lambda _: driver.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        app.close()


if __name__ == "__main__":
    main()
