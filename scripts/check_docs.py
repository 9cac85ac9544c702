"""Check the built docs site (``make docs`` runs it after ``mkdocs build --strict``).

    python scripts/check_docs.py [SITE_DIR]

The entry points take ``**options`` and receive their keywords at import time
(``fused_ls._options.takes_keywords``), so only mkdocstrings' dynamic inspection sees them. This
reads the rendered API page and checks, for every entry point that takes the shared keywords,
that its "Other Parameters" table lists each keyword it takes (``fn.__fused_ls_keywords__``) with
the default and the meaning of ``fused_ls._options.KEYWORDS``, and that its rendered signature
names each keyword with that default. Exits non-zero, listing every mismatch, otherwise.
"""

from __future__ import annotations

import html
import os
import re
import sys
from html.parser import HTMLParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fused_ls  # noqa: E402
from fused_ls import reference  # noqa: E402
from fused_ls._options import KEYWORDS  # noqa: E402

# (the object's id on the API page, the function holding the keywords)
ENTRY_POINTS = [
    ("fused_ls.label_smoothing_cross_entropy", fused_ls.label_smoothing_cross_entropy),
    ("fused_ls.FusedLabelSmoothingCE", fused_ls.FusedLabelSmoothingCE.__init__),
    (
        "fused_ls.linear_label_smoothing_cross_entropy",
        fused_ls.linear_label_smoothing_cross_entropy,
    ),
    ("fused_ls.FusedLinearLabelSmoothingCE", fused_ls.FusedLinearLabelSmoothingCE.__init__),
    ("fused_ls.reference.cross_entropy", reference.cross_entropy),
]
try:  # the integration needs transformers, which the docs environment has (requirements-dev)
    from fused_ls.integrations import transformers as hf

    ENTRY_POINTS.append(("fused_ls.integrations.transformers.apply_fused_ls", hf.apply_fused_ls))
except ImportError as e:
    sys.exit(f"check_docs: cannot import fused_ls.integrations.transformers: {e}")


def plain(text: str) -> str:
    """Text without markup, backticks and repeated whitespace."""
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return " ".join(text.replace("`", "").split())


class Tables(HTMLParser):
    """The rows (lists of cell texts) of every table after an 'Other Parameters:' title."""

    def __init__(self):
        super().__init__()
        self.armed = self.in_table = self.in_cell = False
        self.rows: list[list[str]] = []
        self.text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "table" and self.armed:
            self.in_table, self.armed = True, False
        elif self.in_table and tag == "tr":
            self.rows.append([])
        elif self.in_table and tag == "td":
            self.in_cell, self.text = True, ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        elif tag == "td" and self.in_cell:
            self.rows[-1].append(" ".join(self.text.split()))
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.text += data
        elif "Other Parameters:" in data:
            self.armed = True


def default_text(v) -> str:
    """The default as mkdocstrings renders it (Python source: strings single-quoted)."""
    return repr(v)


def check(page: str) -> list[str]:
    problems = []
    for ident, fn in ENTRY_POINTS:
        at = page.find(f'id="{ident}"')
        if at < 0:
            problems.append(f"{ident}: not on the API page")
            continue
        # the object's own section: up to the next heading of its level (its members are h3)
        end = page.find("<h2", at)
        section = page[at : end if end > 0 else len(page)]
        signature = plain(section[: section.find("doc-contents")])
        parser = Tables()
        parser.feed(section)
        rows = {r[0]: r for r in parser.rows if r}
        for name in fn.__fused_ls_keywords__:
            kw = KEYWORDS[name]
            want_default = default_text(kw.default)
            sig_default = want_default.replace("'", '"')  # signatures are rendered with "..."
            if not re.search(rf"\b{name}: [^=]+ = {re.escape(sig_default)}(,|\))", signature):
                problems.append(f"{ident}: the signature lacks {name} = {sig_default}")
            if name == "smoothing":  # documented under Parameters, with the function's own words
                continue
            row = rows.get(name)
            if row is None or len(row) != 4:
                problems.append(
                    f"{ident}: keyword {name!r} missing from 'Other Parameters' "
                    "(or no Default column: docs/_templates)"
                )
                continue
            _, _, description, default = row
            if plain(default) != want_default:
                problems.append(f"{ident}: {name} default {default!r}, expected {want_default!r}")
            if plain(kw.doc) not in plain(description):
                problems.append(f"{ident}: {name} description {description!r} != {kw.doc!r}")
    return problems


def main() -> int:
    site = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "site")
    path = os.path.join(site, "api", "index.html")
    with open(path, encoding="utf-8") as f:
        page = f.read()
    problems = check(page)
    if problems:
        print(f"check_docs: {path}:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    n = sum(len(fn.__fused_ls_keywords__) for _, fn in ENTRY_POINTS)
    print(
        f"check_docs: {len(ENTRY_POINTS)} entry points, {n} keywords, each in its signature and "
        "'Other Parameters' with its default and meaning"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
