"""Maps that stay true: every package's docstring names each of its modules, and no comment or
docstring cites a file of the repository that is not there."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

from tests.modules import lorafleet_modules

ROOT = Path(__file__).parents[1]
TOP_FOLDERS = ("adapters", "serve", "train", "lorafleet", "tests", "loadtests", "deploy", "docs")
# a file name with a known extension, alone or after folders
CITED = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md|yaml|yml|json|toml|sh|html|css))\b")
MODULES = lorafleet_modules()
PACKAGES = sorted(name for name, path in MODULES.items() if path.name == "__init__.py")


def _children(package: str) -> list[str]:
    """The short names of a package's own modules and subpackages."""
    depth = package.count(".") + 1
    return sorted(
        name.rsplit(".", 1)[1]
        for name in MODULES
        if name.startswith(package + ".") and name.count(".") == depth
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_map_names_each_of_its_modules(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
    named = set(re.findall(r"`(?:lorafleet\.)?([\w.]+?)(?:/|\.py)?`", doc))
    named |= {n.rsplit(".", 1)[-1] for n in named}
    missing = [child for child in _children(package) if child not in named]
    assert not missing, f"{package}'s docstring does not name {missing}"


def _tracked() -> list[str]:
    """The repository's files: tracked, or new and not ignored."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    return subprocess.check_output(command, cwd=ROOT, text=True).split()


def _prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of each comment and docstring of a module."""
    texts = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if doc := ast.get_docstring(node, clean=False):
                texts.append((getattr(node, "lineno", 1), doc))
    return texts


def cited_but_missing(tracked: list[str], sources: dict[str, str]) -> list[str]:
    """Citations of repository files that do not exist: a path under one of the repository's
    folders, or a bare module file name that no file of the repository has. Paths into other
    projects (`vllm/...`) and data files' names (`manifest.json`) are not the repository's."""
    names = {Path(path).name for path in tracked}
    folders = {str(parent) for path in tracked for parent in Path(path).parents}
    missing = []
    for path, source in sources.items():
        for line, text in _prose(source):
            for cited in CITED.findall(text):
                if "/" in cited:
                    ours = cited.split("/")[0] in TOP_FOLDERS
                    if ours and cited not in tracked and cited not in folders:
                        missing.append(f"{path}:{line}: {cited}")
                elif cited.endswith(".py") and cited not in names:
                    missing.append(f"{path}:{line}: {cited}")
    return missing


def test_no_comment_cites_a_file_that_is_not_there():
    tracked = _tracked()
    sources = {p: (ROOT / p).read_text() for p in tracked if p.endswith(".py")}
    assert not cited_but_missing(tracked, sources)


def test_a_citation_of_a_file_that_is_gone_is_found():
    tracked = ["serve/rollouts/state.py", "serve/rollouts/statistics.py"]
    sources = {
        "serve/rollouts/state.py": (
            "# the statistical reasons live in analysis.py\n"
            '"""See serve/rollouts/statistics.py and vllm/lora/request.py."""\n'
            "x = 1  # and serve/rollouts/gone.py\n"
        )
    }
    assert cited_but_missing(tracked, sources) == [
        "serve/rollouts/state.py:1: analysis.py",
        "serve/rollouts/state.py:3: serve/rollouts/gone.py",
    ]
