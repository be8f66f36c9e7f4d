"""Step-through in JupyterLab, checked in a real browser.

Starts ``jupyter lab`` (from this venv) on a temporary copy of notebooks/, opens 03_train.ipynb in Debian's
headless chromium through Selenium, runs every cell with the menu Run > Run All Cells, and checks in the DOM
that the results table and the training-curves figure are shown and that no cell failed.
The copied notebook's parameters cell is cut down (one method, one seed, three epochs) so that it needs no
generated data and runs in seconds; the repository is not touched (outputs go to <tmp>/outputs/lab).

Needs chromium, chromedriver and the pinned selenium: ``bash tests/browser/setup.sh`` installs them.
``SEMMIX_SKIP_BROWSER=1`` skips the test.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_train.ipynb"
SETUP_HINT = "run `bash tests/browser/setup.sh` (or set SEMMIX_SKIP_BROWSER=1 to skip this test)"
SCREENSHOT_COPY = Path("/tmp/semmix_browser_screenshot.png")
# A smaller study that needs nothing from the generate / annotate stages; everything else stays as committed.
REDUCED = {"methods": '["ce"]', "seeds": "[0]", "epochs": "3", "milestones": "[2]"}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
]
SERVER_TIMEOUT = 60     # jupyter lab answering on its port
OPEN_TIMEOUT = 60       # the notebook shown and its kernel started
RUN_TIMEOUT = 150       # Run All Cells finished

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(os.environ.get("SEMMIX_SKIP_BROWSER") == "1",
                       reason="SEMMIX_SKIP_BROWSER=1 set: real-browser JupyterLab test not run"),
]

# Loopback requests must not go through a proxy that the environment may name.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _find(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        pytest.fail(f"`{name}` not found: {SETUP_HINT}", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_parameters(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    source = cell.source
    for name, value in REDUCED.items():
        source, n = re.subn(rf"^{name}\s*=.*$", f"{name} = {value}  # reduced for the browser test",
                            source, flags=re.M)
        assert n == 1, f"{NOTEBOOK}: parameter {name!r} not assigned once in the parameters cell"
    cell.source = source
    nbformat.write(nb, path)


def _lab_settings(settings_dir: Path) -> None:
    """User settings of the test's own JupyterLab: no news / update checks (no network, no toast)."""
    notif = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True, exist_ok=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


class Lab:
    """``jupyter lab`` on 127.0.0.1 in its own session, with a fresh token and its own config folders."""

    def __init__(self, root: Path, work: Path):
        self.root, self.token = root, secrets.token_hex(24)
        self.log_path = work / "jupyter-lab.log"
        self.env = dict(os.environ)
        for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"), ("IPYTHONDIR", "ipython")]:
            (work / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(work / sub)
        _lab_settings(work / "lab-settings")
        jupyter = Path(sys.executable).parent / "jupyter"
        self.jupyter = jupyter if jupyter.exists() else REPO / ".venv" / "bin" / "jupyter"
        self.log = self.proc = None
        self.start()

    def start(self) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(self.jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
        if os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")
        if self.log is not None:
            self.log.close()
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with _HTTP.open(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def wait_ready(self) -> None:
        deadline, tries = time.monotonic() + SERVER_TIMEOUT, 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "already in use" in self.log_tail() and tries < 3:  # lost the race for the free port
                    tries += 1
                    self.start()
                    continue
                pytest.fail(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}", pytrace=False)
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        pytest.fail(f"jupyter lab did not answer on {self.base} in {SERVER_TIMEOUT} s:\n{self.log_tail()}",
                    pytrace=False)

    def notebook_kernel(self):
        """The kernel model ({id, execution_state, ...}) of the session of the test notebook, or None."""
        for session in self.api("/api/sessions"):
            if session.get("path", "").endswith(NOTEBOOK) and session.get("kernel"):
                return session["kernel"]
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # shuts the kernels down too (they run in sessions of their own)
                self.api("/api/shutdown", method="POST")
                self.proc.wait(timeout=20)
            except Exception:
                pass
        _kill_group(self.proc)
        self.log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group of ``proc`` (started with start_new_session=True)."""
    for sig, wait in [(signal.SIGTERM, 10), (signal.SIGKILL, 5)]:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the group may outlive its leader (chromium's helpers): SIGKILL what is left of it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


def _kill_leftovers(marker: str) -> list[int]:
    """SIGKILL any process whose command line names this test's own temporary folder (a kernel, chromium)."""
    killed = []
    if not Path("/proc").is_dir():
        return killed
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def _start_chromium(work: Path):
    chromium, chromedriver = _find("chromium"), _find("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed in {sys.prefix}: {SETUP_HINT}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in CHROMIUM_ARGS + [f"--user-data-dir={work / 'chromium-profile'}"]:
        options.add_argument(arg)
    service = Service(executable_path=chromedriver, log_output=str(work / "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except Exception as err:
        if service.process is not None:
            _kill_group(service.process)
        pytest.fail(f"could not start {chromium} through {chromedriver}: {err}\n(see {work / 'chromedriver.log'}; "
                    f"{SETUP_HINT})", pytrace=False)
    return driver, service


def _stop_chromium(driver, service) -> None:
    try:
        driver.quit()
    except Exception:
        pass
    if service.process is not None:
        _kill_group(service.process)


# The page state in one round trip: prompts of the code cells, errors, tables' headers, images.
STATE_JS = r"""
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
if (!nb) return null;
const prompts = [...nb.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
const out = [...nb.querySelectorAll('.jp-OutputArea')];
const errors = [...nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"],'
                                      + ' .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]')]
    .map(e => e.textContent.slice(0, 2000));
const tracebacks = [...nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => t.includes('Traceback')).map(t => t.slice(0, 2000));
const tables = out.flatMap(o => [...o.querySelectorAll('table')])
    .map(t => [...t.querySelectorAll('th')].map(th => th.textContent.trim()));
const images = out.flatMap(o => [...o.querySelectorAll('img')])
    .map(i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete}));
return {prompts, errors: errors.concat(tracebacks), tables, images};
"""


def _save_screenshot(driver, path: Path) -> Path:
    """The whole notebook: the window grows to the height of the notebook's scroll area first."""
    try:
        top = r"""
            const outer = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
            if (!outer) return 0;
            outer.scrollTop = 0;
            const cells = outer.querySelector('.jp-WindowedPanel-viewport') || outer;
            return Math.ceil(cells.getBoundingClientRect().height - outer.clientHeight);"""
        extra = driver.execute_script(top) or 0
        if extra > 0:  # the cells' height, not the notebook's scroll-past-end space below them
            size = driver.get_window_size()
            driver.set_window_size(size["width"], min(size["height"] + extra + 60, 12000))
            time.sleep(1.5)  # relayout; offscreen cells (content-visibility) get painted
            driver.execute_script(top)
            time.sleep(0.5)
        driver.save_screenshot(str(path))
    except Exception as err:  # a screenshot must not hide the real failure
        print(f"screenshot failed: {err}")
        return path
    shutil.copyfile(path, SCREENSHOT_COPY)
    print(f"screenshot: {path} (copied to {SCREENSHOT_COPY})")
    return path


def test_run_all_cells_of_03_train_in_jupyterlab(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    root = tmp_path / "notebooks"  # the notebooks write to ../outputs/lab, i.e. tmp_path/outputs/lab
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    _reduce_parameters(root / NOTEBOOK)
    n_code = sum(c.cell_type == "code" for c in nbformat.read(root / NOTEBOOK, as_version=4).cells)
    work = tmp_path / "browser"
    work.mkdir()
    screenshot = tmp_path / "03_train_jupyterlab.png"

    lab = driver = service = None
    try:
        driver, service = _start_chromium(work)
        lab = Lab(root, work)
        lab.wait_ready()

        driver.get(f"{lab.base}/lab/tree/{NOTEBOOK}?token={lab.token}")
        wait = WebDriverWait(driver, OPEN_TIMEOUT, poll_frequency=0.5)
        wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell")))

        def kernel_idle(_):
            kernel = lab.notebook_kernel()
            return kernel is not None and kernel.get("execution_state") == "idle"
        wait.until(kernel_idle, message=f"the kernel of {NOTEBOOK} did not start:\n{lab.log_tail()}")

        # Run > Run All Cells, as a person would
        run_menu = [e for e in driver.find_elements(By.CSS_SELECTOR, "#jp-menu-panel .lm-MenuBar-item")
                    if e.text.strip() == "Run"]
        assert run_menu, "no Run menu in JupyterLab's menu bar"
        run_menu[0].click()
        item = wait.until(EC.element_to_be_clickable((By.XPATH, (
            "//li[contains(@class, 'lm-Menu-item')]"
            "[.//div[contains(@class, 'lm-Menu-itemLabel') and normalize-space() = 'Run All Cells']]"))))
        item.click()
        clicked = time.monotonic()

        state = None
        deadline = clicked + RUN_TIMEOUT
        while time.monotonic() < deadline:
            state = driver.execute_script(STATE_JS)
            kernel = lab.notebook_kernel()
            idle = kernel is not None and kernel.get("execution_state") == "idle"
            numbered = state and len(state["prompts"]) == n_code and all(
                re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])
            if idle and state and (numbered or state["errors"]) and time.monotonic() - clicked > 1:
                # settled: every cell has run (or one failed and the rest were not run)
                time.sleep(1.0)
                state = driver.execute_script(STATE_JS)
                break
            time.sleep(0.5)
        else:
            _save_screenshot(driver, screenshot)
            pytest.fail(f"Run All Cells did not finish in {RUN_TIMEOUT} s; prompts "
                        f"{state and state['prompts']}; screenshot {screenshot}", pytrace=False)
        run_seconds = time.monotonic() - clicked
        _save_screenshot(driver, screenshot)

        assert not state["errors"], f"error output in {NOTEBOOK}:\n" + "\n---\n".join(state["errors"])
        assert len(state["prompts"]) == n_code and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]), (
            f"not every code cell ran: {state['prompts']}")
        counts = [int(p[1:-2]) for p in state["prompts"]]
        assert counts == sorted(counts), f"cells ran out of order: {state['prompts']}"
        assert any(any("ece" in h.lower() for h in headers) for headers in state["tables"]), (
            f"no results table with an ECE column; table headers: {state['tables']}")
        assert any(img["complete"] and img["w"] > 100 and img["h"] > 100 for img in state["images"]), (
            f"no figure shown: images {state['images']}")
        assert (tmp_path / "outputs" / "lab" / "train" / "training_curves.png").is_file()
        print(f"{NOTEBOOK}: {n_code} cells run in {run_seconds:.1f} s; whole test {time.monotonic() - started:.1f} s")
    finally:
        if driver is not None:
            _stop_chromium(driver, service)
        if lab is not None:
            lab.stop()
        leftovers = _kill_leftovers(f"{tmp_path}{os.sep}")
        if leftovers:
            print(f"killed leftover processes of this test: {leftovers}")
