"""The explorer notebook (nbs/experiments/explorer.ipynb) driven in JupyterLab in headless Chromium.

A tiny grid (strategies none, random, hull at buffer 2, T=2, micro settings) is run on a synthetic album; a copy of the
notebook with its `parameters` cell pointed at them is opened in JupyterLab, all cells are run from the Run menu, then the
strategy dropdown and the model-t slider are changed as a user would. The plots must follow (heat-map title and outlined
cell, the pool figure appearing and going, the reconstruction image), every plotly figure must be drawn (none blank), one
change must not ship megabytes to the page, and nothing may go wrong on the way: no error/stderr output with a traceback
(cells, widget Output, JupyterLab's log console, where widget callbacks' errors go), no 'no such run', no traceback in the
server's log, no uncaught page error nor console error in the page. About a minute and a half on two busy cores.
"""
import json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'nbs' / 'experiments' / 'explorer.ipynb'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
# the micro settings of tests/test_continual.py, with PSNR only (the explorer shows one metric; the others cost time)
MICRO = dict(projection={'steps': 8}, tuning={'epochs': 2}, free={'steps': 8}, hull={'steps': 8}, n_synth=4, hull_candidates=20,
             metrics=('psnr',))
WAIT_MS = 60_000                    # the longest any single UI step may take (one shared, slow core)
DEADLINE_S = 240                    # the whole browser part, however the steps add up
MAX_REDRAW_BYTES = 3_000_000        # what one change of a control may send to the page (a redraw needs ~0.1 MB)

# Console errors of the page that say nothing about the explorer. Keep this list short and say why.
BENIGN_CONSOLE = [
    # the machine has no network: anything JupyterLab or an extension tries to fetch from outside fails
    re.compile(r'net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|CONNECTION_REFUSED|NETWORK_CHANGED)'),
]

# Tracebacks in the server's log (the kernel's own stderr lands there too: a crash, a failing comm) that are not the
# explorer's: tornado complains when a websocket closes while a message is on its way (a page reload or closing).
BENIGN_SERVER_LOG = re.compile(r'WebSocketClosedError|StreamClosedError')


def _need(mod):
    try: __import__(mod)
    except ImportError: pytest.skip(f"{mod} is not installed (pip install {mod.split('.')[0]})")


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _descendants(pid):
    "Pids of all processes below `pid` (Linux /proc), so that kernels started in their own session are found too."
    children = {}
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: ppid = int((p / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []): out.append(c); todo.append(c)
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError): return False


def _stop_server(proc, base):
    "Shut the kernels down, then the server's process group: SIGTERM, then SIGKILL; stragglers below it by pid."
    if proc.poll() is None:
        try:
            for k in json.loads(urllib.request.urlopen(f'{base}/api/kernels', timeout=5).read()):
                urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{k['id']}", method='DELETE'), timeout=10)
        except Exception: pass
    below = _descendants(proc.pid)
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is None:
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: pass
            try: proc.wait(grace)
            except subprocess.TimeoutExpired: pass
        for p in below:
            if _alive(p):
                try: os.kill(p, sig)
                except ProcessLookupError: pass
        t = time.time() + grace
        while any(_alive(p) for p in below) and time.time() < t: time.sleep(0.2)
    assert proc.poll() is not None, f'jupyter server {proc.pid} would not stop'


@pytest.fixture
def tiny_runs(tmp_path, lab):
    "A synthetic album and a finished grid none / random k=2 / hull k=2, T=2 (about 20 s on one core; `lab` boots meanwhile)."
    from facecl_nb import continual as C, grid as GR, rundir as RD, experiments as X
    from facecl_nb.profiles import get_profile
    from facecl_nb.synth import synth_album
    albums = tmp_path / 'albums'
    synth_album(albums, 'pat', timestamps=2, n_train=3, n_test=2, size=64, seed=5)
    runs = tmp_path / 'runs'
    s = GR.run_grid(albums, ['pat'], ['none', 'random', 'hull'], [2], [0], runs, T=2, overrides=MICRO, log=lambda *a: None)
    assert not s['failed'], s['failed']
    return runs, albums


def _notebook_copy(dest, runs, albums):
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if c.cell_type == 'code' and 'parameters' in c.metadata.get('tags', [])]
    assert len(params) == 1, f'{NOTEBOOK}: expected one cell tagged `parameters`, found {len(params)}'
    src = params[0].source
    for name, value in (('runs_dir', str(runs)), ('album_root', str(albums))):
        assert re.search(rf'^{name}\s*=', src, re.M), f'{NOTEBOOK}: the parameters cell sets no `{name}`'
        src = re.sub(rf'^{name}\s*=.*$', f'{name} = {value!r}', src, flags=re.M)
    params[0].source = src
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nbformat.write(nb, dest)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port, rooted at tmp_path, with its own config/settings/runtime dirs; stopped afterwards.
    Gives `ready()`, which waits until it answers and returns (base url, its log file)."""
    for mod in ('jupyterlab', 'playwright.sync_api'): _need(mod)     # before any work: skip fast where the tools are absent
    if CHROMIUM is None: pytest.skip('no chromium on this machine (apt-get install chromium)')
    port = _free_port(); base = f'http://127.0.0.1:{port}'
    cfg, settings = tmp_path / 'jupyter_config', tmp_path / 'lab_settings'
    cfg.mkdir(); (cfg / 'jupyter_server_config.json').write_text(json.dumps({
        'LabApp': {'news_url': None, 'check_for_updates_class': 'jupyterlab.handlers.announcements.NeverCheckForUpdate'}}))
    notif = settings / '@jupyterlab' / 'apputils-extension'; notif.mkdir(parents=True)
    (notif / 'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', JUPYTER_CONFIG_DIR=str(cfg),
               JUPYTER_RUNTIME_DIR=str(tmp_path / 'jupyter_runtime'), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / 'lab_workspaces'), IPYTHONDIR=str(tmp_path / 'ipython'),
               MPLCONFIGDIR=str(tmp_path / 'mpl'), PYTHONUNBUFFERED='1')
    env.pop('JUPYTER_TOKEN', None); env.pop('JUPYTER_PATH', None)
    log = tmp_path / 'jupyter.log'
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                                 '--ServerApp.port_retries=0', "--ServerApp.token=", "--ServerApp.password=",
                                 '--ServerApp.disable_check_xsrf=True', f'--ServerApp.root_dir={tmp_path}', '--allow-root'],
                                cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    def ready():
        t = time.time() + 90
        while True:
            if proc.poll() is not None: pytest.fail(f'jupyter lab exited ({proc.returncode}):\n{log.read_text()[-3000:]}')
            try:
                if urllib.request.urlopen(f'{base}/api/status', timeout=2).status == 200: break
            except Exception: pass
            if time.time() > t: pytest.fail(f'jupyter lab did not answer on {base} in 90 s:\n{log.read_text()[-3000:]}')
            time.sleep(0.5)
        page = urllib.request.urlopen(f'{base}/lab', timeout=60).read().decode()
        for e in ('@jupyter-widgets/jupyterlab-manager', 'anywidget', 'jupyterlab-plotly'):
            assert e in page, f'the JupyterLab extension {e} is not installed: the explorer cannot render'
        return base, log
    try: yield ready
    finally: _stop_server(proc, base)


def _kernel_connected(base, timeout):
    "Wait until the notebook's kernel has started, has a browser connected and is idle (the server's view)."
    t = time.time() + timeout; seen = None
    while time.time() < t:
        try:
            seen = json.loads(urllib.request.urlopen(f'{base}/api/sessions', timeout=5).read())
            if any(s['kernel']['execution_state'] == 'idle' and s['kernel']['connections'] > 0 for s in seen): return
        except Exception as e: seen = e
        time.sleep(0.5)
    pytest.fail(f'the kernel did not start and connect in {timeout:.0f} s: {seen}')


# --- what the page shows -----------------------------------------------------------------------------------------

STATE_JS = r"""() => {       // what the explorer shows, as text (synchronous: usable as a wait_for_function predicate)
  const txt = s => Array.from(document.querySelectorAll(s)).map(e => e.textContent.trim());
  const plots = Array.from(document.querySelectorAll('.jp-OutputArea .js-plotly-plot'));
  return { titles: txt('.jp-OutputArea .js-plotly-plot .gtitle'),
           plots: plots.length,
           blank: plots.filter(p => !(p.data || []).length).length,      // a plot drawn without any trace
           heat: Array.from(document.querySelectorAll('.jp-OutputArea .js-plotly-plot .shapelayer path')).map(e => e.getAttribute('d')),
           images: document.querySelectorAll('.jp-OutputArea .widget-image').length,
           readouts: txt('.jp-OutputArea .widget-readout') };
}"""

IMAGES_JS = r"""async () => {   // ipywidgets Image uses blob: urls, new at every redraw: compare the bytes
  const hash = async src => {
    const b = new Uint8Array(await (await fetch(src)).arrayBuffer());
    let h = 2166136261; for (const x of b) h = Math.imul(h ^ x, 16777619) >>> 0; return b.length + ':' + h; };
  return await Promise.all(Array.from(document.querySelectorAll('.jp-OutputArea .widget-image')).map(i => hash(i.src)));
}"""

PROBLEMS_JS = r"""() => {
  const out = [];
  for (const e of document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
                                            + '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'))
    if (/Error|Traceback|Exception/.test(e.textContent)) out.push('stderr output: ' + e.textContent.slice(0, 2000));
  for (const e of document.querySelectorAll('.jp-RenderedText, .jp-OutputArea-output'))
    for (const bad of ['Traceback', 'ImportError', 'ModuleNotFoundError', 'no such run', 'no finished runs'])
      if (e.textContent.includes(bad)) out.push(bad + ': ' + e.textContent.slice(0, 2000));
  for (const e of document.querySelectorAll('.jupyter-widgets .jp-RenderedText, .widget-output'))
    if (/Error displaying widget|Failed to load model class|Model not found/.test(e.textContent)) out.push('widget: ' + e.textContent.slice(0, 500));
  return [...new Set(out)];
}"""


def test_explorer_in_jupyterlab(tiny_runs, lab, tmp_path):
    from playwright.sync_api import sync_playwright
    runs, albums = tiny_runs
    t0 = time.time(); say = lambda m: print(f'[explorer-browser {time.time() - t0:5.1f}s] {m}', flush=True)
    base, log = lab()
    say('jupyter lab answers')
    _notebook_copy(tmp_path / 'explorer.ipynb', runs, albums)
    t_end = time.time() + DEADLINE_S
    page_errors, console_errors = [], []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox', '--disable-dev-shm-usage'])
        try:
            page = browser.new_page(viewport={'width': 1600, 'height': 1400})
            page.set_default_timeout(WAIT_MS)
            page.on('pageerror', lambda e: page_errors.append(f'{e}'))
            page.on('console', lambda m: m.type == 'error' and console_errors.append(f'{m.text} @ {m.location}'))
            received = [0]                                # bytes the page got over its websockets (kernel messages)
            page.on('websocket', lambda ws: ws.on('framereceived', lambda f: received.__setitem__(0, received[0] + len(f))))

            def idle():
                page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', state='attached')

            def settle(pred, what):
                """Wait until the page satisfies `pred` (JS, on STATE_JS) with every plot drawn, or shows an error; then until
                the kernel is idle. Fails on any problem; returns the state with the images' hashes."""
                assert time.time() < t_end, f'over {DEADLINE_S} s before: {what}'
                pred = f'(s => s.blank === 0 && s.titles.length === s.plots && ({pred})(s))'
                try: page.wait_for_function(f'() => ({PROBLEMS_JS})().length > 0 || {pred}(({STATE_JS})())',
                                            timeout=WAIT_MS, polling=250)
                except Exception as e:
                    shot = tmp_path / 'failure.png'; page.screenshot(path=shot)
                    now = page.evaluate(STATE_JS)
                    why = (f"{now['blank']} of its {now['plots']} plotly figure(s) stayed blank (no trace, no title)"
                           if now['blank'] else 'it shows something else')
                    raise AssertionError(f'{what}: not seen in {WAIT_MS // 1000} s: {why}; page shows {now}; problems '
                                         f'{page.evaluate(PROBLEMS_JS)}; page errors {page_errors}; screenshot {shot}') from e
                no_problems(what)
                idle(); page.wait_for_timeout(500); idle()         # later redraws of the same change land too
                no_problems(what)
                say(what)
                return dict(page.evaluate(STATE_JS), images=page.evaluate(IMAGES_JS))

            def interact(action, pred, what):
                "Do `action`, settle on `pred`; one redraw of the explorer must not ship megabytes to the page."
                before = received[0]; action(); state = settle(pred, what)
                sent = received[0] - before
                assert sent < MAX_REDRAW_BYTES, (
                    f'{what}: {sent / 1e6:.1f} MB went to the page for one change (limit {MAX_REDRAW_BYTES / 1e6:.0f} MB). The explorer '
                    'builds new plotly FigureWidgets at every redraw: each carries plotly.js (its 5 MB anywidget _esm) and, made '
                    'fresh inside an HBox, at random renders blank (no trace, no title) and never recovers.')
                return state

            def no_problems(when):
                probs = page.evaluate(PROBLEMS_JS)
                assert not probs, f'{when}: the notebook shows errors:\n' + '\n'.join(probs)
                assert not page_errors, f'{when}: uncaught errors in the page: {page_errors}'
                bad = [c for c in console_errors if not any(p.search(c) for p in BENIGN_CONSOLE)]
                assert not bad, f'{when}: console errors in the page: {bad}'
                tracebacks = [b for b in log.read_text().split('Traceback')[1:] if not BENIGN_SERVER_LOG.search(b[:3000])]
                assert not tracebacks, f'{when}: traceback in the jupyter server/kernel log:\n' + \
                    '\nTraceback'.join(tracebacks)[-4000:]

            say('chromium started')
            page.goto(f'{base}/lab/tree/explorer.ipynb', wait_until='domcontentloaded')
            page.wait_for_selector('.jp-NotebookPanel .jp-Cell', timeout=90_000)
            _kernel_connected(base, min(90, t_end - time.time()))   # else Run All asks which kernel to start
            idle(); say('notebook open, kernel idle')
            # View > Show Log Console: where JupyterLab puts what widget callbacks print, their tracebacks included
            page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^View$')).click()
            page.locator('.lm-Menu-item[data-command="logconsole:open"]').click()
            page.wait_for_selector('.jp-LogConsole', state='attached')
            # Run > Run All Cells, as a user would (window.jupyterapp is not exposed without --expose-app-in-browser)
            page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).click()
            page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
            assert page.locator('.jp-Dialog').count() == 0, f"a dialog came up: {page.locator('.jp-Dialog').inner_text()}"

            s0 = settle("s => s.titles.some(t => t.includes('R[1,0]')) && s.images === 2", 'the explorer after Run All')
            dropdowns = page.locator('.jp-OutputArea .widget-dropdown')
            strategy = dropdowns.filter(has_text='strategy').locator('select')
            assert strategy.locator('option').all_inner_texts() == ['none', 'random', 'hull'], 'strategies offered'
            assert strategy.input_value() == 'none'
            assert s0['titles'][0].startswith('Lower bound R[1,0] = '), s0['titles']
            assert s0['plots'] == 1, f'the lower bound has no buffer, hence no pool plot: {s0}'

            # strategy -> random: the R map is another run's, the pool and buffer plot appears, buffer k offers 2
            s1 = interact(lambda: strategy.select_option('random'),
                          "s => s.titles.some(t => t.startsWith('ER-Rand k=2 R[1,0]')) && s.plots === 2",
                          'ER-Rand k=2 after choosing strategy random')
            assert 'pool and buffer chosen at t=1' in s1['titles'], s1['titles']
            assert dropdowns.filter(has_text='buffer').locator('select').locator('option').all_inner_texts() == ['2']
            assert s1['titles'] != s0['titles']

            # model t: 1 -> 0 with the keyboard on the slider's handle
            handle = page.locator('.jp-OutputArea .widget-slider').filter(has_text='model t').locator('.noUi-handle')
            s2 = interact(lambda: (handle.focus(), page.keyboard.press('ArrowLeft')),
                          "s => s.titles.some(t => t.startsWith('ER-Rand k=2 R[0,0]')) && s.plots === 1",
                          'R[0,0] and no pool plot after moving model t to 0')
            assert s2['readouts'][0] == '0', s2['readouts']
            assert s2['heat'] != s1['heat'], 'the outlined cell of R did not move'
            assert s2['images'][0] == s1['images'][0], 'the test photo changed although k and photo did not'
            assert s2['images'][1] != s1['images'][1], 'the reconstruction did not change from the model after t=1 to t=0'

            # strategy -> hull at t=0 (a redraw with the slider moved), then t back to 1: the pool plot returns
            interact(lambda: strategy.select_option('hull'), "s => s.titles.some(t => t.startsWith('ER-Hull k=2 R[0,0]'))",
                     'ER-Hull k=2 after choosing strategy hull')
            s4 = interact(lambda: (handle.focus(), page.keyboard.press('ArrowRight')),
                          "s => s.titles.some(t => t.startsWith('ER-Hull k=2 R[1,0]')) && s.plots === 2",
                          'R[1,0] and the pool plot after moving model t back to 1')
            assert 'pool and buffer chosen at t=1' in s4['titles'], s4['titles']
            no_problems('at the end')
            if console_errors: say(f'console errors taken as benign: {console_errors}')
        finally:
            browser.close()
