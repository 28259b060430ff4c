"""Every notebook as a person meets it: JupyterLab in headless Chromium, driven through Playwright.

nbmake runs the notebooks' kernels; this test runs the page. One JupyterLab server (a free local
port, a token, ``WORKBENCH_SMOKE=1`` so its kernels run the smoke mode) and one browser serve every
notebook. Each notebook opens alone in a fresh workspace (``/lab/workspaces/<fresh>/tree/<nb>?reset``),
runs with the menu's Run > Run All Cells, and the test asserts:

- no cell has an error output, and every code cell ran (an execution count) with the kernel idle;
- every ipywidgets control the notebook shows is rendered: for each widget output the kernel lists the
  controls in the widget's tree, and each one's label and input stand visible in the page (and no
  "Error displaying widget" anywhere);
- changing a dropdown of a panel that draws below itself (notebook 00's layer dropdown, 01's router
  panel, ...) draws a figure in the panel, and changing it again changes the image;
- a screenshot of the whole notebook is kept in ``runs/browser/<notebook>.png`` (on failure too).

The server is never allowed to write a notebook: autosave is off in a throw-away settings folder and
its contents manager refuses every save, so the tracked notebooks stay as they are. It is stopped in
every outcome (terminate, wait, kill on timeout).

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it) and PyPI's
``playwright`` (the dev extra); never ``playwright install``, which downloads a browser. Without
either, the test skips with one line saying what to install.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
SHOTS = ROOT / "runs" / "browser"
CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
RUN_TIMEOUT_S = float(os.environ.get("BROWSER_NOTEBOOK_TIMEOUT", "600"))  # one Run All, smoke: 1-5 min, 2 shared cores
SERVER_START_S = 120
MAX_SHOT_HEIGHT = 30000  # px; a longer notebook is cut at the bottom
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"browser test: no Chromium at {CHROMIUM}; install it with `apt-get install -y chromium` (.ci/run does)"
    for module, extra in (("playwright", "dev"), ("jupyterlab", "notebooks"), ("ipywidgets", "notebooks")):
        try:
            __import__(module)
        except ImportError:
            return f"browser test: {module} is not installed; install it with `.venv/bin/pip install -e '.[{extra}]'`"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# --- the JupyterLab server --------------------------------------------------------------------

# Loaded by the server: no notebook is ever written, whatever the page asks.
_SERVER_CONFIG = '''
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado import web


class NoSaveContentsManager(AsyncLargeFileManager):
    async def save(self, model, path=""):
        raise web.HTTPError(403, f"the browser test does not write files ({path})")


c.ServerApp.contents_manager_class = NoSaveContentsManager
'''

# User settings of the throw-away settings folder: no autosave, every cell in the page (the
# default windowing leaves cells out of view out of the DOM), no news prompt.
_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server (it shuts its kernels down), then kill whatever of its process group is
    left, the server itself on a timeout and any kernel (the server runs in a session of its own)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on notebooks/ (base URL, token); stopped whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="browser-test-lab-"))
    (tmp / "jupyter_server_config.py").write_text(_SERVER_CONFIG)
    for name, value in _SETTINGS.items():
        (tmp / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "settings" / name).write_text(json.dumps(value))
    token, port = secrets.token_hex(16), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernels' inline backend
    env.update(WORKBENCH_SMOKE="1", WANDB_MODE="disabled", JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), PYTHONUNBUFFERED="1")
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={NOTEBOOK_DIR}", f"--config={tmp / 'jupyter_server_config.py'}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
         f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
        cwd=NOTEBOOK_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n"
                                   f"{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer in {SERVER_START_S} s:\n"
                                   f"{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "log": tmp / "server.log"}
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# --- what the page is asked (through window.jupyterapp, exposed by the server's flag) ---------

_PANEL_JS = """
(path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.content && w.content.model) return w;
  }
  return null;
}
"""

# The notebook's state: kernel status, code cells without an execution count, error outputs.
_STATE_JS = """
(path) => {
  const panel = (FIND_PANEL)(path);
  if (!panel) return {ready: false};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets;
  let code = 0, pending = 0;
  const errors = [];
  cells.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    code += 1;
    if (cell.model.executionCount === null) pending += 1;
    for (const out of cell.model.outputs.toJSON()) {
      if (out.output_type === 'error')
        errors.push({cell: i, ename: out.ename, evalue: out.evalue,
                     traceback: (out.traceback || []).join('\\n').replace(/\\x1b\\[[0-9;]*m/g, '')});
    }
  });
  return {ready: true, status: kernel ? kernel.status : 'none', code, pending, errors};
}
""".replace("FIND_PANEL", _PANEL_JS)

# Tags every widget output's element with data-browser-test="<cell>-<output>" and lists them.
_WIDGET_OUTPUTS_JS = """
(path) => {
  const panel = (FIND_PANEL)(path);
  const found = [];
  panel.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    cell.model.outputs.toJSON().forEach((out, j) => {
      const view = out.data && out.data['WIDGET_MIME'];
      if (!view) return;
      const child = cell.outputArea.widgets[j];
      const tag = `${i}-${j}`;
      if (child) child.node.setAttribute('data-browser-test', tag);
      found.push({tag, cell: i, model_id: view.model_id, in_page: !!child});
    });
  });
  return found;
}
""".replace("FIND_PANEL", _PANEL_JS).replace("WIDGET_MIME", WIDGET_MIME)

# Asks the kernel (silently: no output, no execution count) which controls each widget holds.
_KERNEL_CONTROLS = '''
def _browser_test_controls(model_ids):
    import base64, json
    from ipywidgets import Box, DOMWidget, Output
    from ipywidgets.widgets.widget import _instances

    def walk(w):
        if isinstance(w, Box):
            for child in w.children:
                yield from walk(child)
        elif isinstance(w, Output):
            for out in w.outputs:
                view = out.get("data", {}).get("WIDGET_MIME")
                if view and view.get("model_id") in _instances:
                    yield from walk(_instances[view["model_id"]])
        elif isinstance(w, DOMWidget):
            options = [str(label) for label in getattr(w, "_options_labels", ())]
            yield {"type": type(w).__name__, "description": getattr(w, "description", "") or "",
                   "options": options}

    found = {m: list(walk(_instances[m])) if m in _instances else None for m in model_ids}
    return base64.b64encode(json.dumps(found).encode()).decode()
'''.replace("WIDGET_MIME", WIDGET_MIME)

_KERNEL_JS = """
async ([path, code, expression]) => {
  const panel = (FIND_PANEL)(path);
  const kernel = panel.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, silent: true, store_history: false,
                                        user_expressions: {result: expression}});
  const reply = await future.done;
  const r = reply.content.user_expressions.result;
  if (r.status !== 'ok') return {error: `${r.ename}: ${r.evalue}`};
  return {text: r.data['text/plain']};
}
""".replace("FIND_PANEL", _PANEL_JS)


def _kernel_controls(page, path: str, model_ids: list[str]) -> dict:
    r = page.evaluate(_KERNEL_JS, [path, _KERNEL_CONTROLS, f"_browser_test_controls({model_ids!r})"])
    assert "error" not in r, f"asking the kernel for the widgets' controls failed: {r['error']}"
    return json.loads(base64.b64decode(r["text"].strip("'\"")))


# --- the test -----------------------------------------------------------------------------------


def _screenshot(page, name: str) -> Path:
    """The whole notebook: the window grows to the notebook's height for the picture."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{Path(name).stem}.png"
    height = page.evaluate("""(path) => {
      const panel = (FIND_PANEL)(path);
      const outer = panel && panel.content.node.querySelector('.jp-WindowedPanel-outer');
      if (!outer) return 0;
      outer.scrollTop = 0;
      return outer.scrollHeight + window.innerHeight - outer.clientHeight;
    }""".replace("FIND_PANEL", _PANEL_JS), name)
    if height:
        page.set_viewport_size({"width": 1280, "height": max(800, min(int(height) + 20, MAX_SHOT_HEIGHT))})
        page.wait_for_timeout(1000)
    page.screenshot(path=str(path))
    return path


def _wait_state(page, path: str, timeout_s: float, done) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = page.evaluate(_STATE_JS, path)
        if state.get("ready") and done(state):
            return state
        if time.monotonic() > deadline:
            return state
        page.wait_for_timeout(500)


def _check_widgets(page, path: str) -> list[dict]:
    """Every control of every widget output stands in the page; returns the panels (tag, controls)."""
    outputs = page.evaluate(_WIDGET_OUTPUTS_JS, path)
    assert all(o["in_page"] for o in outputs), f"widget outputs missing from the page: {outputs}"
    controls = _kernel_controls(page, path, [o["model_id"] for o in outputs]) if outputs else {}
    assert page.locator("text=Error displaying widget").count() == 0, "a widget failed to display"
    panels = []
    for o in outputs:
        listed = controls.get(o["model_id"])
        assert listed is not None, f"cell {o['cell']}: the kernel has no widget {o['model_id']}"
        area = page.locator(f'[data-browser-test="{o["tag"]}"]')
        area.scroll_into_view_if_needed()
        assert area.locator(".jupyter-widgets").first.is_visible(), \
            f"cell {o['cell']}: the widget output is not rendered: {area.inner_text()[:300]!r}"
        for control in listed:
            if control["description"]:
                label = area.locator(".widget-label", has_text=control["description"]).first
                assert label.is_visible(), f"cell {o['cell']}: control {control} is not shown"
                box = area.locator(".widget-inline-hbox", has=page.locator(
                    ".widget-label", has_text=control["description"])).first
                assert box.locator("select, input, .slider, .widget-readout, button").first.is_visible(), \
                    f"cell {o['cell']}: control {control} shows its label but no input"
        panels.append({**o, "controls": listed, "area": area})
    return panels


def _image_srcs(area) -> list[str]:
    """What the panel's output shows: its images' sources, or the HTML of each output for a panel
    that draws HTML rather than a figure (notebook 06's text coloured by expert)."""
    srcs = area.locator(".widget-output img").evaluate_all("els => els.map(e => e.src)")
    if srcs:
        return srcs
    return area.locator(".widget-output .jp-OutputArea-output").evaluate_all("els => els.map(e => e.innerHTML)")


def _check_redraw(page, panel: dict) -> str:
    """Changes the panel's first dropdown twice: each time the panel draws a new image (or new HTML)."""
    area = panel["area"]
    select = area.locator(".widget-dropdown select").first
    options = select.locator("option").evaluate_all("els => els.map(e => e.value)")
    current = select.input_value()
    others = [o for o in options if o != current]
    assert others, f"cell {panel['cell']}: the dropdown has one option only"
    seen: list[str] = []
    for value in (others[0], others[1] if len(others) > 1 else current):
        select.select_option(value)
        deadline = time.monotonic() + 120
        while True:
            srcs = _image_srcs(area)
            if srcs and srcs[-1] not in seen:
                seen.append(srcs[-1])
                break
            assert time.monotonic() < deadline, \
                f"cell {panel['cell']}: choosing {value!r} drew no new figure in 120 s ({len(srcs)} images)"
            page.wait_for_timeout(250)
    return select.evaluate("e => e.closest('.widget-dropdown').querySelector('.widget-label').textContent")


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_in_jupyterlab(lab, browser, notebook):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    try:
        workspace = f"browser-test-{Path(notebook).stem}-{secrets.token_hex(4)}"
        page.goto(f"{lab['base']}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab['token']}")
        page.wait_for_function(f"() => ({_PANEL_JS})({json.dumps(notebook)}) !== null", timeout=120_000)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        state = _wait_state(page, notebook, 120, lambda s: s["status"] == "idle")
        assert state.get("status") == "idle", f"the kernel did not start: {state}"

        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        t0 = time.monotonic()
        page.wait_for_timeout(1000)
        state = _wait_state(page, notebook, RUN_TIMEOUT_S,
                            lambda s: s["errors"] or (s["status"] == "idle" and s["pending"] == 0))
        ran_s = time.monotonic() - t0
        assert not state["errors"], "error output:\n" + "\n".join(
            f"cell {e['cell']}: {e['ename']}: {e['evalue']}\n{e['traceback'][-2000:]}" for e in state["errors"])
        assert state["pending"] == 0 and state["status"] == "idle", \
            f"Run All did not finish in {RUN_TIMEOUT_S:.0f} s: {state['pending']} of {state['code']} code " \
            f"cells without an execution count, kernel {state['status']}"

        panels = _check_widgets(page, notebook)
        redrawable = [p for p in panels if any(c["type"] == "Dropdown" for c in p["controls"])
                      and p["area"].locator(".widget-output").count()]
        if notebook.startswith("00_"):
            assert redrawable, "notebook 00 shows no layer dropdown above a figure"
        if redrawable:
            _check_redraw(page, redrawable[0])
        n_controls = sum(len(p["controls"]) for p in panels)
        print(f"{notebook}: ran in {ran_s:.0f} s, {state['code']} code cells, {len(panels)} widget outputs, "
              f"{n_controls} controls{', redraw checked' if redrawable else ''}")
    finally:
        with contextlib.suppress(Exception):
            _screenshot(page, notebook)
        context.close()
