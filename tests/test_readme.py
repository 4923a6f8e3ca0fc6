"""The README stays true: its Quick start and its code snippets are what the project runs."""

import configparser
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_quick_start_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    commands = _code_blocks(_section("Quick start"), "bash")
    lines = [line for block in commands for line in block.splitlines() if line.strip()]
    assert lines == ["make demo", "make test"], lines
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ci_commands == ["make test"], ci_commands


def test_makefile_targets_of_the_quick_start_create_the_venv_and_install():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup$", makefile, re.M)
    assert re.search(r"^test: lint$", makefile, re.M)
    assert re.search(r"^lint: setup$", makefile, re.M)
    assert "-m venv" in makefile and "pip install" in makefile


def test_losses_snippet_runs_and_the_student_learns(capsys):
    (snippet,) = _code_blocks(_section("Using the losses in your own JAX project"), "python")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    first, last = namespace["history"][0], namespace["history"][-1]
    assert last < 0.5 * first, (first, last)


def _install_requires() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].strip().splitlines()
    return [re.split(r"[\[<>=~! ]", line.strip(), maxsplit=1)[0] for line in lines if line.strip()]


@pytest.mark.parametrize("dependency", _install_requires())
def test_every_runtime_dependency_is_explained_in_the_readme(dependency):
    assert f"`{dependency}`" in _section("Dependencies")


def test_every_local_link_in_the_readme_exists():
    links = re.findall(r"\]\(((?:docs|flags|notebooks)/[^)#]+)\)", README)
    assert links, "the README links its docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
