"""git_info says which tracked files differ, so a run made beside regenerated docs is told
apart from one made with edited code (the run file's "changed")."""

import subprocess

import pytest

from gastune.experiments.report import _dirty_note
from gastune.provenance import git_info


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    for name in ("docs/table.md", "src/code.py", "old.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    return tmp_path


def test_clean_checkout(repo):
    info = git_info(repo)
    assert len(info["commit"]) == 40
    assert info["dirty"] is False and info["changed"] == []


def test_changed_lists_tracked_edits_and_renames_not_untracked_files(repo):
    (repo / "docs/table.md").write_text("v2\n")
    (repo / "untracked.txt").write_text("new\n")  # untracked: not a change to the commit
    _git(repo, "mv", "old.txt", "docs/new.txt")
    info = git_info(repo)
    assert info["dirty"] is True
    assert info["changed"] == ["docs/new.txt", "docs/table.md"]
    assert _dirty_note(info) == " (dirty: docs only)"
    (repo / "src/code.py").write_text("v2\n")
    info = git_info(repo)
    assert info["changed"] == ["docs/new.txt", "docs/table.md", "src/code.py"]
    assert _dirty_note(info) == " (dirty)"


def test_an_unstaged_edit_listed_first_keeps_its_whole_path(repo):
    # " M docs/table.md" is the first porcelain line here: its leading space is a status column.
    (repo / "docs/table.md").write_text("v2\n")
    (repo / "src/code.py").write_text("v2\n")
    info = git_info(repo)
    assert info["changed"] == ["docs/table.md", "src/code.py"]
    assert (
        info["commit"]
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
    )


def test_outside_a_checkout(tmp_path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None, "changed": None}


def test_dirty_note_of_older_run_files_without_changed():
    assert _dirty_note({"commit": "a", "dirty": False}) == ""
    assert _dirty_note({"commit": "a", "dirty": True}) == " (dirty)"
