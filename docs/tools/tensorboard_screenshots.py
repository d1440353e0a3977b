"""Screenshots of TensorBoard's energy panels for tutorial 4, into ``docs/_static/tensorboard/``.

The PNGs are committed; neither CI nor the docs build runs this script (it needs a browser).
Rerun it after a change to what a run writes to TensorBoard, or to tutorial 4's run::

    apt-get install -y chromium                       # headless Chromium (Debian's package)
    python3 docs/tools/tensorboard_screenshots.py     # trains tutorial 4's run; about 40 s
    python3 docs/tools/tensorboard_screenshots.py --run runs/default   # or shows a run folder

What it does: trains ``experiments/configs/default.toml`` with tutorial 4's overrides (12
epochs, training metrics every 5 steps, CPU) through
:func:`spiking_moe.experiment.run_experiment`, as ``spiking-moe-train`` does, into a temporary
folder; starts ``tensorboard --logdir <folder> --port <a free port>`` and waits until it serves
the run's energy tags; loads each page with ``chromium --headless --screenshot`` (TensorBoard
takes the tab and the tag filter from the URL: ``#scalars&tagFilter=...``); crops it to the
panels, reduces it to 256 colours (TensorBoard's flat colours survive it) and writes it, failing
if a page came out blank (a page captured before its charts loaded) or too large. Then look at
the PNGs before committing them.

Made with TensorBoard 2.21 and Chromium 150; the crop boxes are in page pixels of that
TensorBoard's layout at the window sizes below.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "default.toml"
OUT = ROOT / "docs" / "_static" / "tensorboard"
#: Tutorial 4's overrides (docs/tutorials/04_train_from_config.py).
OVERRIDES = ["train.epochs=12", "train.log_every=5", "train.device=cpu"]
#: The largest PNG written (the docs pages stay light).
MAX_BYTES = 300_000


@dataclass(frozen=True)
class View:
    """One screenshot.

    Attributes:
        name: file name without ``.png``.
        fragment: the TensorBoard URL after ``#``: the tab and its settings.
        window: browser window ``(width, height)`` in pixels.
        crop: ``(left, top, right, bottom)`` kept of the page, in pixels.
    """

    name: str
    fragment: str
    window: tuple[int, int]
    crop: tuple[int, int, int, int]


VIEWS = (
    # Validation accuracy beside energy per sample and two energy ratios, over the steps.
    View(
        "scalars_energy",
        "scalars&_smoothingWeight=0&tagFilter="
        "val%2F(accuracy%7Cenergy%2F(uJ_per_sample%7Cratio_dense_snn%7Cratio_ann_fp32))%24",
        (1100, 860),
        (0, 0, 1100, 765),
    ),
    # The custom-scalars layout of energy.tensorboard: val_energy first, then test_energy.
    View("custom_scalars", "custom_scalars&_smoothingWeight=0", (1100, 1000), (0, 0, 1100, 1000)),
    # The test set's Markdown report: a window wide enough for the baseline table to fit its
    # cells (the card's height is fixed: it scrolls to the rest), cropped to the card.
    View("text_report", "text&tagFilter=test_energy", (1900, 800), (350, 70, 1895, 740)),
    # Expert load and firing-rate histograms, one slice per validation.
    View("histograms_energy", "histograms&tagFilter=val_energy%2F", (1100, 700), (0, 0, 1100, 680)),
)


def train(folder: Path) -> Path:
    """Tutorial 4's run, trained into ``folder/default_short``; returns the run folder."""
    import torch

    from spiking_moe import load_config
    from spiking_moe.experiment import run_experiment

    torch.set_num_threads(1)
    run = folder / "default_short"
    result = run_experiment(load_config(CONFIG), run, overrides=OVERRIDES)
    print(
        f"trained {run} in {result.wall_time_s:.1f} s: test accuracy "
        f"{result.metrics['test/accuracy']:.4f}, "
        f"{result.metrics['test/energy/uJ_per_sample']:.4f} uJ per sample"
    )
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tags(base: str, run: str, tag: str, timeout_s: float = 120.0) -> None:
    """Wait until TensorBoard serves ``tag`` of ``run`` (it reads event files in the
    background after it starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as reply:
                if tag in json.load(reply).get(run, {}):
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"TensorBoard at {base} did not serve {run}/{tag} in {timeout_s:.0f} s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def capture(browser: str, url: str, window: tuple[int, int], path: Path, profile: Path) -> None:
    """One headless screenshot of ``url``; the virtual-time budget lets the page's scripts
    fetch and draw the charts before the capture."""
    subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def finish(raw: Path, view: View, out: Path) -> int:
    """Crop, reduce to 256 colours and write ``out``; returns its size in bytes."""
    image = Image.open(raw).convert("RGB").crop(view.crop)
    colours = image.getcolors(maxcolors=1 << 24)
    commonest = max(count for count, _ in colours)
    if commonest > 0.97 * image.width * image.height or len(colours) < 50:
        raise RuntimeError(f"{view.name}: the page looks blank (still loading?); see {raw}")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{out}: {size:,} bytes, more than {MAX_BYTES:,}; crop it smaller")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder to show instead of training one")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder of the PNGs ({OUT})")
    args = parser.parse_args(argv)
    browser = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.run.resolve() if args.run else train(work / "runs")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        # A relative --logdir: the pages show "runs", not a temporary path.
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", run.parent.name]
            + ["--host", "127.0.0.1", "--port", str(port)],
            cwd=run.parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_tags(base, run.name, "val/energy/uJ_per_sample")
            args.out.mkdir(parents=True, exist_ok=True)
            for view in VIEWS:
                raw = work / f"{view.name}.raw.png"
                capture(browser, f"{base}/#{view.fragment}", view.window, raw, work / "chromium")
                out = args.out / f"{view.name}.png"
                size = finish(raw, view, out)
                print(f"{out} ({size / 1024:.0f} KiB)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
