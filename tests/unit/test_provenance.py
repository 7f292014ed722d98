"""The commit stamp of benchmark rows: the code's commit, marked ``-dirty`` when the package differs from it."""

from __future__ import annotations

import subprocess

import nnunet_semi
from nnunet_semi.tools.benchmark import common


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_the_commit_stamp_marks_a_dirty_package_but_not_result_files(tmp_path, monkeypatch):
    package = tmp_path / "nnunet_semi"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "results.md").write_text("old\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    monkeypatch.setattr(nnunet_semi, "__file__", str(package / "__init__.py"))
    assert common.code_commit() == sha
    (tmp_path / "benchmarks" / "results.md").write_text("new results\n")  # a cell writing its tables
    assert common.code_commit() == sha
    (package / "__init__.py").write_text("x = 1\n")  # the code that runs is not the commit's
    assert common.code_commit() == f"{sha}-dirty"
    copy = tmp_path.parent / f"{tmp_path.name}_copy_without_git"  # outside the repository
    (copy / "nnunet_semi").mkdir(parents=True)
    monkeypatch.setattr(nnunet_semi, "__file__", str(copy / "nnunet_semi" / "__init__.py"))
    monkeypatch.setenv("NNUNET_SEMI_COMMIT", "abc1234")
    assert common.code_commit() == "abc1234"  # a copy without .git: the commit it was given
