"""The documentation stays true to the code and to the repository: generated reference pages are
current, every page is in the site's navigation, the README is a short front door whose links
resolve, and no file names a path outside the repository."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# Notes kept beside the repository, never part of it; spelt in pieces so that this file does not
# name them itself.
OUTSIDE = ["shared/" + name for name in ("env-notes", "pitfalls", "design", "style")] + [
    "../" + "shared"
]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_reference_page_is_what_the_code_generates():
    generate = _generator()
    pages = generate.render()
    assert {path.name for path in pages} >= {
        "configuration.md",
        "openapi.json",
        "http-api.md",
        "cli.md",
    }
    stale = [str(path.relative_to(ROOT)) for path in generate.stale(pages)]
    assert not stale, (
        f"generated pages differ from the code: {', '.join(stale)}; "
        f"run `{generate.COMMAND}` (or `make docs-ref`) and commit the result"
    )


def test_the_configuration_reference_has_every_setting_with_its_environment_variable():
    from lorafleet.serve.settings import Settings

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        assert f"`LORAFLEET_{name.upper()}`" in page, name
        assert field.description, f"Settings.{name} needs Field(description=...)"


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_every_navigation_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = _nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(in_nav) == on_disk
    assert len(in_nav) == len(set(in_nav)), "a page is in the navigation twice"


def test_the_readme_is_a_short_front_door_that_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail into docs/"
    sections = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert sections, "README.md has no sections"
    first = lines[sections[0] : sections[1] if len(sections) > 1 else len(lines)]
    assert "make demo" in "\n".join(first) and "make test" in "\n".join(first), (
        f"the first section of README.md ({lines[sections[0]]!r}) must give `make demo` and "
        "`make test`"
    )
    headings = [line for line in lines[1 : sections[0]] if re.match(r"#{1,6} ", line)]
    assert not headings, f"README.md has headings before the two commands: {headings}"


def test_every_relative_link_in_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t[0] != "#"]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    assert not [t for t in local if t.startswith("..") or t.startswith("/")]


# A repository path the pages name: under one of its folders, with a file's extension, or in
# backticks and ending in "/".
TOP_FOLDERS = "adapters|serve|train|lorafleet|tests|loadtests|deploy|docs|requirements"
CITED = re.compile(
    rf"(?<![\w./-])((?:{TOP_FOLDERS})/(?:[\w.-]+/)*[\w.-]+\.(?:py|md|yaml|yml|json|toml|sh|png))\b"
    rf"|`((?:{TOP_FOLDERS})/(?:[\w.-]+/)*)`"
)


def test_every_repository_path_the_readme_and_the_pages_name_exists():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    missing = []
    for page in pages:
        for match in CITED.finditer(page.read_text(encoding="utf-8")):
            cited = match.group(1) or match.group(2)
            if re.search(r"(^|/)[A-Z]/|/[A-Z]\.py$", cited):
                continue  # a pattern such as `X/Y.py`, not a file
            if not (ROOT / cited).exists():
                missing.append(f"{page.relative_to(ROOT)}: {cited}")
    assert not missing, "pages name files that are not there:\n" + "\n".join(missing)


def _repository_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = []
    for name in filter(None, listed):
        path = ROOT / name.decode()
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_file_of_the_repository_names_a_path_outside_it():
    offenders = []
    for path in _repository_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, "files name notes outside the repository:\n" + "\n".join(offenders)


def test_the_outside_paths_check_finds_one(tmp_path):
    """The needles match what they are meant to (and only that: a tenant named "shared" in a URL
    is not a file)."""
    mention = tmp_path / "note.md"
    mention.write_text("as " + OUTSIDE[0] + ".md says\n/admin/tenants/shared/limits\n")
    text = mention.read_text()
    assert [needle for needle in OUTSIDE if needle in text] == [OUTSIDE[0]]
