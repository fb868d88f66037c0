"""Screenshots of the MLflow UI for docs/operations.md, from a real run: start `msdda ui` on a home that
holds a registry (e.g. after `msdda run`), open its pages in headless Chromium, write PNGs.

    MSDDA_HOME=/tmp/demo msdda run --config configs/tiny.yaml     # or any home with a registry
    python benchmarks/ui_screenshots.py --home /tmp/demo          # writes docs/img/*.png

Pages: the registered model (versions, the `champion` alias, lineage tags), the champion version (else the
latest; its description and tags), and, if the home holds a sweep run, its Pareto plot and the MSDDA sweep
grid as MLflow artifacts. Each page is captured once its expected text has rendered (the UI is a React
app), through the DevTools protocol (benchmarks/chromium.py). Prints one JSON object: the files written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chromium import Browser, find_chromium

CLOSE_ASSISTANT = (
    "Array.from(document.querySelectorAll('button[aria-label=\"Close\"]')).forEach(b => b.click())"
)
SCROLL_TO = (
    "(Array.from(document.querySelectorAll('h1,h2,h3,h4,span,div'))"
    ".find(e => e.childElementCount === 0 && e.textContent.trim() === %s) || document.body)"
    ".scrollIntoView({block: 'start'})"
)
IMAGE_SHOWN = "Array.from(document.images).some(i => i.complete && i.naturalWidth >= 200)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(home: Path, port: int) -> tuple[subprocess.Popen, dict]:
    """`msdda ui --json` on ``home``'s own store; returns the process and the addresses it printed."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MSDDA_HOME=str(home), PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(300)
    if not line or not line[0].strip():
        process.kill()
        raise SystemExit(f"msdda ui did not start (exit code {process.poll()})")
    return process, json.loads(line[0])


def sweep_run(home: Path) -> tuple[str, str] | None:
    """``(experiment_id, run_id)`` of the latest sweep run in ``home``'s store, if any."""
    from mlflow import MlflowClient

    from flows.tracking import EXPERIMENT, tracking_uri

    client = MlflowClient(tracking_uri(home))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`msdda.job` = 'sweep'", order_by=["start_time DESC"], max_results=1
    )
    return (experiment.experiment_id, runs[0].info.run_id) if runs else None


def capture(
    browser: Browser,
    url: str,
    expected: list[str],
    path: Path,
    image: bool = False,
    scroll_to: str | None = None,
) -> Path:
    """Open ``url``, wait for ``expected`` text (and a loaded image with ``image``), close the assistant
    panel, scroll the element whose text is ``scroll_to`` to the top, screenshot."""
    browser.open("about:blank")  # a fresh load: the app keeps its state across changes of the #route
    browser.open(url)
    browser.wait_for_text(expected)
    browser.call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
    deadline = time.monotonic() + 60
    while image and time.monotonic() < deadline:
        shown = browser.call("Runtime.evaluate", expression=IMAGE_SHOWN, returnByValue=True)
        if shown.get("result", {}).get("value"):
            break
        time.sleep(0.5)
    if scroll_to:
        browser.call("Runtime.evaluate", expression=SCROLL_TO % json.dumps(scroll_to))
    time.sleep(1.0)  # let the layout settle after the panel closed
    return browser.screenshot(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="MSDDA_HOME holding the registry")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNGs")
    parser.add_argument("--model", default="msdda-ink_economy", help="registered model to show")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1200)
    args = parser.parse_args()
    if find_chromium() is None:
        raise SystemExit("no Chromium binary on PATH (apt-get install chromium)")
    home = args.home.resolve()
    os.environ["MSDDA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from flows.tracking import run_url
    from flows.ui import model_version_url

    process, info = start_ui(home, free_port())
    written = []
    try:
        model = next((m for m in info["models"] if m["name"] == args.model), None)
        if model is None:
            raise SystemExit(f"no registered model {args.model!r} in {home}")
        base = info["url"]
        with Browser(width=args.width, height=args.height, timeout=120) as browser:
            expected = [args.model, "Version 1"] + (["champion"] if model["champion"] is not None else [])
            written.append(
                capture(browser, model["url"], expected, args.out / "registry.png", scroll_to="Versions")
            )
            version = model["champion"] or max(model["versions"])  # its description says why (not) champion
            url = model_version_url(base, args.model, version)
            written.append(capture(browser, url, ["champion:", "reference_hash"], args.out / "version.png"))
            sweep = sweep_run(home)
            if sweep is not None:
                for artifact, name in (
                    ("pareto.png", "sweep-pareto.png"),
                    ("grids/msdda.png", "sweep-grid.png"),
                ):
                    url = run_url(base, *sweep, artifact)
                    written.append(capture(browser, url, [Path(artifact).name], args.out / name, image=True))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    print(json.dumps({"files": [str(p) for p in written]}))


if __name__ == "__main__":
    main()
