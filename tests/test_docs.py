"""README.md and the pages under docs/ point only at what exists, and the README stays a front page.

- Every relative markdown link ``[text](path#anchor)`` outside code resolves to an existing file (or
  folder) relative to the page; an anchor into a markdown page must be one of its headings
  (GitHub's slugs). ``http(s)://`` and ``mailto:`` links are not followed.
- Every fenced code block names its language, so no shell block goes unchecked; in each ``bash``,
  ``sh``, ``shell`` or ``console`` block and in every inline code span (the commands quoted in the
  prose), every token that names a script (``scripts/...``), a tool (``tools/....py``), a config
  (``cfgs/...``), a docs page (``docs/...``) or ``main.py`` exists. A token holding ``<``, ``*``, ``{``, ``[`` or ``$`` is a placeholder or a shell pattern standing
  for many files (``cfgs/scanobjectnn/any2point_<source>.yaml``, ``experiments/table7_*_seed*``) and
  is skipped.
- The README has at most 200 lines.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]+`")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SHELL = {"bash", "sh", "shell", "console"}
PATH_TOKEN = re.compile(r"(?<![\w./-])((?:scripts|tools|cfgs|docs)/[^\s'\"`;|&()]+|main\.py)(?![\w.-])")
PLACEHOLDER = set("<*{[$")


def fences(text: str) -> list[tuple[str, str]]:
    """The ``(language, body)`` of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def slugs(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (outside code blocks)."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(page: Path, text: str) -> list[str]:
    """The relative links of ``text`` (the page at ``page``) whose file or anchor does not exist."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md":
            own = text if file == page else file.read_text(encoding="utf-8")
            if anchor not in slugs(own):
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def unlabelled_fences(text: str) -> list[str]:
    """The first line of every fenced block that does not name its language."""
    return [body.splitlines()[0] if body else "" for language, body in fences(text) if not language]


def missing_paths(text: str, root: Path) -> list[str]:
    """The scripts, tools, configs, docs pages and ``main.py`` named in the shell blocks and the
    inline code of ``text`` that do not exist under ``root`` (placeholders skipped, see the module
    docstring)."""
    commands = [body for language, body in fences(text) if language in SHELL]
    commands += INLINE_CODE.findall(FENCE.sub("", text))
    missing = []
    for command in commands:
        for token in PATH_TOKEN.findall(command):
            token = token.rstrip(".,:")
            if PLACEHOLDER & set(token):
                continue
            if token.startswith("tools/") and not token.endswith(".py"):
                continue
            if not (root / token).exists():
                missing.append(token)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_names_only_existing_files(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert unlabelled_fences(text) == []
    assert missing_paths(text, ROOT) == []


def test_the_readme_fits_on_a_front_page() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_the_docs_have_the_topic_pages_and_the_readme_links_them() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


def test_the_checks_find_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/run.sh").write_text("")
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part: one\n")
    page = tmp_path / "page.md"
    text = "\n".join([
        "# Title",
        "[ok](other.md#its-part-one) [ok](#title) [web](https://example.org/x) `[code](nowhere.md)`",
        "[gone](missing.md) [bad anchor](other.md#no-such-part) [bad own anchor](#nothing)",
        "run `python tools/inline_gone.py\n--config cfgs/a.yaml` or `bash scripts/run.sh` (not scripts/prose.sh)",
        "```bash",
        "bash scripts/run.sh && bash scripts/gone.sh --config cfgs/<source>.yaml",
        "python tools/absent.py experiments/table7_*_seed* cfgs/a/*.yaml main.py",
        "```",
        "```",
        "bash scripts/unchecked.sh",
        "```",
        "```text",
        "scripts/not_a_command.sh",
        "```",
    ]) + "\n"
    page.write_text(text)
    assert [b.split(":")[0] for b in broken_links(page, text)] == ["missing.md", "other.md#no-such-part", "#nothing"]
    assert missing_paths(text, tmp_path) == ["scripts/gone.sh", "tools/absent.py", "main.py", "tools/inline_gone.py",
                                             "cfgs/a.yaml"]
    assert unlabelled_fences(text) == ["bash scripts/unchecked.sh"]
