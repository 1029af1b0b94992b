"""Where Ray keeps its session: a folder short enough for its socket paths, whatever HOME is."""

import tempfile
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.serving.distributed import (
    MAX_SESSION_ROOT,
    ReplicaStartError,
    session_root,
)
from {{ cookiecutter.package_name }}.settings import load_settings


def test_the_session_folder_is_short_whatever_the_cache_folder(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)
    settings = load_settings(cache_dir=deep)
    root = session_root(settings)
    assert len(str(deep)) > 200
    assert len(str(root)) <= MAX_SESSION_ROOT
    assert root.parent == Path(tempfile.gettempdir())
    assert session_root(settings) == root  # the same project keeps its folder
    assert session_root(load_settings(cache_dir=tmp_path / "other")) != root


def test_a_temp_folder_too_long_for_sockets_is_one_clear_line(tmp_path, monkeypatch):
    long_tmp = tmp_path / ("t" * 60)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with pytest.raises(ReplicaStartError, match="set TMPDIR to a folder") as caught:
        session_root(load_settings(cache_dir=tmp_path))
    assert "\n" not in str(caught.value)
