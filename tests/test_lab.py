"""JupyterLab, as a user sees it: `make lab` must open the notebooks with the kit's own kernel.

The slow test starts the virtualenv's JupyterLab on a free port with a random token, offline and
writing nothing to ``~`` (every Jupyter/IPython/matplotlib/chromium folder and ``HOME`` point into a
temporary folder), opens ``00_parent.ipynb`` in Debian's headless chromium driven by selenium, and
checks what is on the screen: the notebook panel with every cell of the ``.ipynb``, the first cell's
title, the kernel "Python 3 (puzzlelib)" reaching idle, and the parameters cell running to ``[1]:``.
It also asks the kernel which Python it is, so a kernel from another environment cannot pass.
A screenshot is kept in ``test-artifacts/jupyterlab-00_parent.png``.

Chromium and chromedriver come from Debian (``make browser-deps``); selenium is given the driver's
path, so selenium-manager never tries to download a browser or a driver. Without them the test
skips locally and fails under CI (``CI`` set), so CI can never skip it silently.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_parent.ipynb"
KERNEL_DISPLAY_NAME = "Python 3 (puzzlelib)"  # what the Makefile's `ipykernel install` names it
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "jupyterlab-00_parent.png"

# Chromium reaches for Google's hosts (updates, sync, field trials) unless told not to; on a closed
# network that only costs time and log noise, but it must never be what a test waits on.
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
]
# Bounded but generous: the CI machine is shared and a cold JupyterLab start is slow there.
SERVER_START_S = 120
RENDER_S = 180
KERNEL_S = 180


def _need(ok: bool, why: str) -> None:
    """Skip on a developer's machine, fail under CI: the browser test must not vanish from CI."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}. CI must run the JupyterLab browser test: .ci/run installs chromium "
                    "and chromedriver with `make browser-deps` before `make test`.")
    pytest.skip(f"{why}; `make browser-deps` installs chromium and chromedriver (Debian/Ubuntu)")


def _isolated_env(tmp: Path) -> dict[str, str]:
    """The environment for JupyterLab, its kernel and chromium: every home-folder write lands in tmp."""
    env = dict(os.environ)
    for var, sub in [("HOME", "home"), ("JUPYTER_CONFIG_DIR", "jupyter/config"),
                     ("JUPYTER_DATA_DIR", "jupyter/data"), ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"),
                     ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "matplotlib"),
                     ("XDG_CACHE_HOME", "home/.cache"), ("XDG_CONFIG_HOME", "home/.config")]:
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
    return "\n".join(lines[-n:])


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path
    proc: subprocess.Popen


@pytest.fixture
def lab(tmp_path):
    """The venv's JupyterLab serving a copy of notebooks/ (so no checkpoint lands in the repo)."""
    tmp = tmp_path / "lab"
    root = tmp / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = _isolated_env(tmp)
    # The news toast would cover the notebook in the screenshot; it is also a network fetch.
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly",  # the "pypi" manager would query PyPI
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: lets the test ask the kernel
           "--allow-root"]  # CI runs as root; JupyterLab refuses root without it
    with open(log, "w") as out:
        # Own session, so teardown can stop the server and whatever it started, and nothing else.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield Lab(url, token, root, log, proc)
    finally:
        _stop_server(proc, url, token)


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by a container's init) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _stop_server(proc: subprocess.Popen, url: str, token: str) -> None:
    """/api/shutdown stops the kernels cleanly; signals to the server's own group are the fallback."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, OSError):
            pass
    for sig, wait_s in [(None, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)]:
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def browser(tmp_path):
    """Debian's headless chromium under selenium, with a fresh profile; quit on teardown."""
    _need(shutil.which("chromium") is not None, "chromium is not installed")
    _need(shutil.which("chromedriver") is not None, "chromedriver is not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need(False, "selenium is not installed (it is in the `test` extras: pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium then skips selenium-manager, which would try to download.
    service = Service(shutil.which("chromedriver"), log_output=str(tmp_path / "chromedriver.log"),
                      env=_isolated_env(tmp_path / "browser"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(KERNEL_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what: str, timeout: float, lab: Lab, condition):
    """WebDriverWait, but a timeout says what was awaited and shows the server's log."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5,
                             ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "jupyterlab-00_parent-failure.png"))
        pytest.fail(f"JupyterLab: no {what} after {timeout:.0f} s (screenshot in "
                    f"test-artifacts/jupyterlab-00_parent-failure.png); server log:\n{_tail(lab.log)}")


_ASK_KERNEL = """
const done = arguments[arguments.length - 1];
const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
const future = kernel.requestExecute({code: arguments[0], store_history: false});
let out = "";
future.onIOPub = (msg) => {
  if (msg.header.msg_type === "stream") out += msg.content.text;
  if (msg.header.msg_type === "error") out += "ERROR " + msg.content.ename + ": " + msg.content.evalue;
};
future.done.then(() => done(out), (err) => done("ERROR " + err));
"""
_WHO_ARE_YOU = ("import json, os, sys, puzzlelib; print(json.dumps({'prefix': sys.prefix, "
                "'pid': os.getpid(), 'cwd': os.getcwd(), 'puzzlelib': list(puzzlelib.__path__)[0]}))")


def test_notebooks_name_the_kernel_the_venv_installs():
    """`make lab` finds each notebook's kernel by name: it must be the one the Makefile installs."""
    names = {p.name: nbformat.read(p, as_version=4).metadata.get("kernelspec", {}).get("name")
             for p in sorted((REPO / "notebooks").glob("*.ipynb"))}
    assert len(names) >= 7 and set(names.values()) == {"python3"}, names
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    assert spec.is_file(), f"no python3 kernelspec in {sys.prefix}: run `make venv`"
    shown = json.loads(spec.read_text())["display_name"]
    assert shown == KERNEL_DISPLAY_NAME, (
        f"{spec} is named {shown!r}; `make venv` installs it with `python -m ipykernel install "
        f"--sys-prefix --name python3 --display-name '{KERNEL_DISPLAY_NAME}'`")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_jupyterlab_opens_00_parent_with_the_kits_kernel(browser, lab):  # browser first: skips early
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    nb = nbformat.read(lab.root / NOTEBOOK, as_version=4)
    title = nb.cells[0].source.splitlines()[0].lstrip("#").strip()
    assert nb.cells[0].cell_type == "markdown" and title, "00_parent.ipynb should open with a title"
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)

    t0 = time.perf_counter()
    browser.get(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    cells = f"{panel} .jp-Notebook > .jp-WindowedPanel-outer .jp-Notebook-cell"

    _wait(browser, f"notebook panel with {len(nb.cells)} cells", RENDER_S, lab,
          lambda d: len(d.find_elements(By.CSS_SELECTOR, cells)) == len(nb.cells))
    tab = browser.find_element(By.CSS_SELECTOR, ".lm-DockPanel-tabBar .lm-mod-current .lm-TabBar-tabLabel")
    assert tab.text == NOTEBOOK
    heading = browser.find_elements(By.CSS_SELECTOR, cells)[0].find_element(By.CSS_SELECTOR, "h1")
    assert heading.is_displayed() and heading.text.replace("¶", "").strip() == title

    # The toolbar says "No Kernel" until the session has one; then it must be the kit's kernel.
    kernel_name = f"{panel} .jp-Toolbar-kernelName"
    shown = _wait(browser, "kernel name in the notebook toolbar", KERNEL_S, lab,
                  lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, kernel_name)
                             if e.text.strip() not in ("", "No Kernel")])
    assert shown == [KERNEL_DISPLAY_NAME], (
        f"JupyterLab opened {NOTEBOOK} with kernel {shown}, not {KERNEL_DISPLAY_NAME!r}: `make venv` "
        "installs it (python -m ipykernel install --sys-prefix --name python3 ...)")
    indicator = f"{panel} .jp-Notebook-ExecutionIndicator"
    _wait(browser, "idle kernel", KERNEL_S, lab,
          lambda d: d.find_element(By.CSS_SELECTOR, indicator).get_attribute("data-status") == "idle")

    # The kernel must be the venv's Python with this checkout's puzzlelib, not merely named right.
    answer = browser.execute_async_script(_ASK_KERNEL, _WHO_ARE_YOU)
    assert not answer.startswith("ERROR"), answer
    kernel = json.loads(answer)
    assert Path(kernel["prefix"]).resolve() == Path(sys.prefix).resolve(), kernel
    assert Path(kernel["puzzlelib"]).resolve().is_relative_to(REPO), kernel

    # Run the parameters cell the way a user does: select it, Shift+Enter, see its prompt turn to [1].
    cell = browser.find_elements(By.CSS_SELECTOR, cells)[params]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    prompt = cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt")
    assert prompt.text.strip() == "[ ]:"
    prompt.click()
    browser.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
    _wait(browser, "[1]: prompt on the parameters cell", KERNEL_S, lab,
          lambda d: prompt.text.strip() == "[1]:")
    _wait(browser, "idle kernel after running the parameters cell", KERNEL_S, lab,
          lambda d: d.find_element(By.CSS_SELECTOR, indicator).get_attribute("data-status") == "idle")
    seconds = time.perf_counter() - t0

    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                           browser.find_elements(By.CSS_SELECTOR, cells)[0])
    time.sleep(0.5)  # let the scroll settle before the picture
    assert browser.save_screenshot(str(SCREENSHOT))
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, len(png)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert min(width, height) >= 600, (width, height)
    # A blank or single-colour page (an error screen, a white tab) has few distinct colours.
    import matplotlib.image

    pixels = matplotlib.image.imread(SCREENSHOT)[..., :3].reshape(-1, 3)
    assert len({tuple(p) for p in pixels[:: 97].round(2).tolist()}) > 30
    print(f"JupyterLab: notebook rendered, kernel idle and a cell run in {seconds:.1f} s; "
          f"kernel pid {kernel['pid']}, cwd {kernel['cwd']}")

    # Stopping the server must stop the kernel it started: no process outlives the test.
    _stop_server(lab.proc, lab.url, lab.token)
    assert lab.proc.poll() is not None, "jupyter lab still running after shutdown"
    deadline = time.monotonic() + 30
    while _alive(kernel["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(kernel["pid"]):
        os.kill(kernel["pid"], signal.SIGKILL)  # the kernel this test started, by its own pid
        pytest.fail(f"kernel {kernel['pid']} outlived the JupyterLab shutdown")
