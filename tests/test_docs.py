"""The documentation stands on its own: no file points outside the repository, every
``docs/<page>.md`` a file names exists, and each method page explains its paper."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", "outputs", "multirun", "wandb", "__pycache__", "build",
                ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".mk", ".toml", ".txt", ".cfg", ".sh"}
# Built from parts so that this file does not match itself.
OUTSIDE_PATHS = ("specs" + "/", "../" + "shared", "DESIGN" + ".md")
METHOD_PAPERS = {"pela": "2310.10700", "spectrum": "2502.15092",
                 "numerical_pruning": "2412.12441", "dln": "2311.05061", "soka": "2506.15251"}


def repository_text_files():
    # os.walk so that ignored trees (a .venv inside the checkout) are pruned, not read
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders
                               if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder, name)
            if path.suffix in TEXT_SUFFIXES or name == "Makefile":
                yield path


def test_no_file_refers_to_paths_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in repository_text_files()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if any(outside in line for outside in OUTSIDE_PATHS)]
    assert not found, f"references to files outside the repository: {found}"


def test_every_docs_page_a_file_names_exists():
    named = {(page, path.relative_to(ROOT)) for path in repository_text_files()
             for page in re.findall(r"\bdocs/[\w-]+\.md", path.read_text(errors="replace"))}
    missing = sorted(str(where) + " -> " + page for page, where in named
                     if not (ROOT / page).is_file())
    assert named and not missing, missing


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def method_section(text: str) -> str:
    start = text.index("\n## The method\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


@pytest.mark.parametrize("page", sorted(METHOD_PAPERS))
def test_method_page_explains_its_paper(page):
    text = (ROOT / "docs" / f"{page}.md").read_text()
    assert "\n## The method\n" in text, f"docs/{page}.md has no '## The method' section"
    section = method_section(text)
    assert f"arXiv {METHOD_PAPERS[page]}" in section
    assert "```" in section, "the method section carries its formulas in a code block"
    assert "differ" in section.lower() or "here |" in section, "paper vs project settings"


@pytest.mark.parametrize("page", sorted(METHOD_PAPERS))
def test_links_within_a_method_page_reach_a_heading(page):
    text = (ROOT / "docs" / f"{page}.md").read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in text.splitlines()
               if line.startswith("#")}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert not [link for link in links if link not in anchors], sorted(anchors)


def test_github_anchor_matches_githubs_rule():
    assert github_anchor(" The SoKA adapter (`method=soka`)") == "the-soka-adapter-methodsoka"
    assert github_anchor("The method") == "the-method"
