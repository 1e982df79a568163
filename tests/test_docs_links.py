"""Every relative link in the repository's Markdown files points at a file or folder that exists, and every
`#anchor` on a Markdown target names one of its headings (GitHub's slugs), so a moved page cannot leave a dead link."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and [text](target "title")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
SKIP = {".git", ".venv", ".venv-vllm", "node_modules", "out", "runs"}


def markdown_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.md") if not SKIP & set(p.relative_to(root).parts))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of one Markdown file that do not resolve inside the repository, as `FILE: target (why)`
    (a link out of the repository, such as ../shared/X, resolves on no other clone)."""
    text = CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: {target}"
        if not dest.is_relative_to(root):
            broken.append(f"{where} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading #{anchor})")
    return broken


def test_every_relative_link_in_markdown_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files and len(files) > 5
    broken = [b for path in files for b in broken_links(path)]
    assert not broken, "dead links:\n" + "\n".join(broken)


def test_a_dead_link_and_a_dead_anchor_are_found(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "outside.md").write_text("# out\n")
    page = root / "page.md"
    (root / "other.md").write_text("# A heading, with `code`\n")
    page.write_text(
        "[ok](other.md#a-heading-with-code) [gone](missing.md) [bad](other.md#nope) [out](../outside.md) "
        "[web](https://example.com/x.md) `[in code](missing.md)`\n"
    )
    assert [b.split(": ", 1)[1] for b in broken_links(page, root)] == [
        "missing.md (no such file)",
        "other.md#nope (no heading #nope)",
        "../outside.md (outside the repository)",
    ]
