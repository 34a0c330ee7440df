"""dynsnap_core.config: one place for every DYNSNAP_* setting, overridable in-process; test hooks gated."""
from __future__ import annotations

import pytest

from dynsnap_core import config
from dynsnap_core.config import defaults


def test_get_reads_environment_then_default(monkeypatch):
    monkeypatch.delenv("DYNSNAP_STAGING", raising=False)
    assert defaults.get("staging") == "auto"
    monkeypatch.setenv("DYNSNAP_STAGING", "target")
    assert defaults.get("staging") == "target"
    monkeypatch.setenv("DYNSNAP_STAGING", "")           # empty counts as unset
    assert defaults.get("staging") == "auto"


def test_set_overrides_and_context_manager_restores(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNSNAP_HOME", str(tmp_path / "env"))
    assert config.home() == tmp_path / "env"
    with defaults.set("home", tmp_path / "over"):
        assert config.home() == tmp_path / "over"
        assert config.weights_store() == tmp_path / "over" / "weights"
        with defaults.set({"restore_prefetch": "tmpfs", "home": None}):
            assert defaults.get("restore_prefetch") == "tmpfs"
            assert config.home() == tmp_path / "env"
        assert defaults.get("restore_prefetch") == "pagecache"
        assert config.home() == tmp_path / "over"
    assert config.home() == tmp_path / "env"


def test_unknown_setting_is_one_sentence():
    with pytest.raises(KeyError, match="no dynsnap setting 'nope'"):
        defaults.get("nope")
    with pytest.raises(KeyError, match="no dynsnap setting 'nope'"):
        defaults.set("nope", "1")
    with pytest.raises(TypeError):
        defaults.set("home")


def test_test_hooks_need_the_test_switch(monkeypatch):
    monkeypatch.setenv("DYNSNAP_FAULT", "dump")
    monkeypatch.delenv("DYNSNAP_TEST_HOOKS", raising=False)
    assert config.test_hook("FAULT") is None            # an ordinary environment cannot switch a fault on
    monkeypatch.setenv("DYNSNAP_TEST_HOOKS", "1")
    assert config.test_hook("FAULT") == "dump"
    with pytest.raises(KeyError):
        config.test_hook("HOME")


def test_no_module_reads_dynsnap_environment_itself():
    """Only config.py reads DYNSNAP_* from os.environ (subprocess environments passed along are fine)."""
    import pathlib
    import re
    pkg = pathlib.Path(config.__file__).parent
    bad = []
    for p in sorted(pkg.rglob("*.py")):
        if p.name == "config.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"environ(\.get)?[\[(]\s*[\"']DYNSNAP_", line) or re.search(r"getenv\(\s*[\"']DYNSNAP_", line):
                bad.append(f"{p.relative_to(pkg)}:{n}: {line.strip()}")
    assert bad == []
