"""The documents a reader opens first: every relative link in README.md and docs/*.md
names a file or folder in the repository, README.md stays a front door, and its test
command is the one CI runs."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")))
# [text](target) or [text](target "title"); images too.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def relative_links(path: str) -> list[str]:
  """The Markdown link targets in `path` that point into the repository (no scheme,
  not a bare anchor), outside code (fenced or inline), with any '#anchor' dropped."""
  with open(path, encoding="utf-8") as f:
    text = CODE.sub("", FENCE.sub("", f.read()))
  targets = (m.group(1) for m in LINK.finditer(text))
  return [t.split("#", 1)[0] for t in targets
          if not EXTERNAL.match(t) and not t.startswith("#")]


def test_link_parser_on_a_known_page(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("See [a](docs/a.md#top), ![b](img/b.png \"B\"), [c](https://x.org/c),"
                  " [d](#here), [0.1, 0.2] (n=3), `[e](e.md)` in code.\n"
                  "```\n[f](not/a/link.md)\n```\n", encoding="utf-8")
  assert relative_links(str(page)) == ["docs/a.md", "img/b.png"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(doc):
  base = os.path.dirname(doc)
  missing = [t for t in relative_links(doc) if not os.path.exists(os.path.join(base, t))]
  assert not missing, f"{os.path.relpath(doc, REPO)}: links to missing paths {missing}"


def test_readme_is_a_front_door():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_test_command_is_what_ci_runs():
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    command = f.read().strip().splitlines()[-1]
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert f"```bash\n{command}\n```" in readme
