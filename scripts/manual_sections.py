"""Documentation manuals as items: generated HTML (DocBook, Sphinx) split at its headings, one item per heading
with the text up to the next one. The parsers of `scripts.build_dev_collections`' Debian collections."""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


@dataclass
class Item:
    """One page or section of a manual: its title and its body paragraphs (raw, cleaned later)."""

    page: str
    level: int  # heading level: a section belongs to the closest preceding item of a lower level
    title: str
    paragraphs: list[str]


class HeadingSplitter(HTMLParser):
    """Generated HTML (DocBook, Sphinx) -> one item per heading (h1-h4): its text -> the text up to the next
    heading. Navigation, tables of contents, sidebars, figure/table/example captions, permalink marks and
    admonition headers ("Note") are skipped."""

    SKIP_CLASSES = {"navheader", "navfooter", "toc", "list-of-figures", "list-of-tables", "list-of-examples",
                    "mediaobject", "indexterm", "sphinxsidebar", "related", "footer", "mobile-nav", "headerlink",
                    "contents", "toctree-wrapper"}
    ADMONITIONS = {"note", "tip", "warning", "caution", "important", "seealso", "admonition"}
    HEADINGS = {"h1", "h2", "h3", "h4"}
    BLOCKS = {"p", "div", "li", "dt", "dd", "pre", "tr", "table", "blockquote", "br", "h5", "h6", *HEADINGS}
    VOID = {"br", "hr", "img", "meta", "link", "col", "input", "area", "base", "wbr"}

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.page, self.items = page, []
        self.stack: list[tuple[str, bool, bool]] = []  # open elements: (tag, skipped, inside an admonition)
        self.heading: list[str] | None = None
        self.paragraph: list[str] = []

    def _flush(self) -> None:
        text = "".join(self.paragraph).strip()
        if text and self.items:
            self.items[-1].paragraphs.append(text)
        self.paragraph = []

    def handle_starttag(self, tag, attrs):
        classes = set((dict(attrs).get("class") or "").split())
        skipped, admonition = self.stack[-1][1:] if self.stack else (False, False)
        admonition = admonition or bool(classes & self.ADMONITIONS)
        skipped = (skipped or tag in {"head", "script", "style"} or bool(classes & self.SKIP_CLASSES)
                   or (tag == "p" and "title" in classes)
                   or (admonition and (tag in {"th", *self.HEADINGS} or "admonition-title" in classes)))
        if tag in self.BLOCKS and not skipped:
            self._flush()
            if tag in self.HEADINGS:
                self.heading = []
        if tag not in self.VOID:
            self.stack.append((tag, skipped, admonition))

    def handle_endtag(self, tag):
        if tag in self.VOID or all(t != tag for t, _, _ in self.stack):
            return
        while self.stack[-1][0] != tag:
            self.stack.pop()
        skipped = self.stack.pop()[1]
        if tag in self.HEADINGS and self.heading is not None and not skipped:
            self.items.append(Item(self.page, int(tag[1]), "".join(self.heading), []))
            self.heading = None
        elif tag in self.BLOCKS and not skipped:
            self._flush()

    def handle_data(self, data):
        if not (self.stack and self.stack[-1][1]):
            (self.paragraph if self.heading is None else self.heading).append(data)


def html_items(files) -> list[Item]:
    items = []
    for path in files:
        parser = HeadingSplitter(path.as_posix())
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        parser._flush()
        items.extend(parser.items)
    return items


def gimp_help_items(root: Path) -> list[Item]:
    """GIMP 2.10 user manual in Russian (DocBook HTML, a page per section, split at its sub-headings)."""
    return html_items(sorted((root / "usr/share/gimp/2.0/help/ru").glob("*.html")))


def postgresql_doc_items(root: Path) -> list[Item]:
    """PostgreSQL 15 manual (DocBook HTML), split at headings; the release notes (release-*.html) left out."""
    folder = next(root.glob("usr/share/doc/postgresql-doc-*/html"))
    return html_items(p for p in sorted(folder.glob("*.html")) if not p.name.startswith("release"))


def pages(folder: Path, skip: tuple[str, ...]) -> list[Path]:
    """The HTML pages under `folder` whose path (relative to it) contains none of the `skip` strings."""
    return [p for p in sorted(folder.rglob("*.html")) if not any(k in p.relative_to(folder).as_posix() for k in skip)]


def python_doc_items(root: Path) -> list[Item]:
    """Python 3.11 documentation (Sphinx HTML), split at headings; "What's New", the changelog and the index
    pages left out."""
    folder = next(root.glob("usr/share/doc/python3.*/html"))
    return html_items(pages(folder, ("whatsnew/", "genindex", "py-modindex", "search.html", "contents.html",
                                     "index.html", "bugs.html", "copyright.html", "license.html", "about.html",
                                     "download.html")))


def linux_doc_items(root: Path) -> list[Item]:
    """Linux 6.1 kernel documentation (Sphinx HTML), split at headings. Left out: the translations (not English),
    Sphinx's copies of the reST sources, the index and search pages, the ABI listings (admin-guide/abi*.html:
    sysfs paths with What/Date/Contact fields, hardly prose) and the MAINTAINERS list (process/maintainers.html:
    names, addresses and file patterns)."""
    folder = next(root.glob("usr/share/doc/linux-doc-*/html"))
    return html_items(pages(folder, ("translations/", "_sources/", "_static/", "genindex", "search.html",
                                     "admin-guide/abi", "process/maintainers.html")))


def anarchist_faq_items(root: Path) -> list[Item]:
    """An Anarchist FAQ (HTML, a page per question with its sub-questions as headings): the question pages of
    sections A-J (secA1.html ... secJ7.html) and of the appendices (append11.html ... append46.html). Left out,
    because their headings repeat questions, which would then be no query (a repeated title) anywhere: the contents
    pages (sec?con.html, append1/2/3/4.html: append2.html opens with its own contents) and append13*.html, an older
    version of section F; also the front matter and the sections' introductions."""
    folder = root / "usr/share/doc/anarchism/html"
    files = [*folder.glob("sec[A-J][0-9]*.html"), *folder.glob("append[0-9][0-9]*.html")]
    return html_items(sorted(p for p in files if not p.name.startswith("append13")))
