"""Model folders copied to and from a store never delete what they did not make."""

import pytest

from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.lifecycle.artifacts import (
    pull_dir,
    push_dir,
    safe_path,
)


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_a_pull_replaces_only_a_folder_it_made(model, tmp_path):
    store = tmp_path / "store"
    push_dir(model, str(store))
    target = tmp_path / "pulled"
    pull_dir(str(store), target)
    assert (target / "config.json").is_file()
    pull_dir(str(store), target)  # its own folder: replaced
    assert (target / "config.json").is_file()


def test_a_pull_refuses_a_folder_with_files_of_its_own(model, tmp_path):
    store = tmp_path / "store"
    push_dir(model, str(store))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ModelSourceError, match="did not put there"):
        pull_dir(str(store), precious)
    with pytest.raises(ModelSourceError, match="did not put there"):
        push_dir(model, str(precious))
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd", "."])
def test_stored_names_that_escape_the_target_are_refused(tmp_path, name):
    with pytest.raises(ModelSourceError, match="outside"):
        safe_path(tmp_path.resolve(), name, "s3://bucket/model")


def test_a_stored_name_inside_the_target_is_kept(tmp_path):
    root = tmp_path.resolve()
    assert safe_path(root, "sub/weights.bin", "s3://b/m") == root / "sub" / "weights.bin"
