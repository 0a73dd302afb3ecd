"""Keep the test suite's disk footprint small.

The end-to-end tests write real run folders (a tuned generator per timestamp, 15–70 MB each): left in place, one
`pytest` session leaves about 4 GB under pytest's temporary folder, and a CI machine whose disk is shared can run out
of space mid-suite (`OSError: [Errno 28] No space left on device` in a grid test). So:

- a passing test's `tmp_path` is deleted as soon as it passes (`tmp_path_retention_policy = "failed"` in
  `pyproject.toml`); a failing test's is kept for inspection;
- the folders a test module makes with `tmp_path_factory` (its module-scoped albums and grids) are deleted when the
  module ends, unless one of its tests failed. (No fixture here is session-scoped; one that made folders would have to
  be exempted, or the first module's end would delete them.)
"""
import shutil

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed: item.module.__dict__['_facecl_failed'] = True      # remembered per module, read at its teardown
    return rep


@pytest.fixture(scope='module', autouse=True)
def _module_tmp_cleanup(request, tmp_path_factory):
    "Delete what this module's fixtures made under pytest's base temporary folder, once the module is done and passed."
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__dict__.get('_facecl_failed'): return
    for p in set(base.iterdir()) - before:
        if p.is_symlink(): p.unlink(missing_ok=True)                     # pytest's `<name>current` links, dangling once their folder is gone
        elif p.is_dir(): shutil.rmtree(p, ignore_errors=True)
