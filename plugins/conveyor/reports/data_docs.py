"""Great Expectations Data Docs made safe to open and readable offline.

GX's pages load jQuery, Bootstrap, Vega and Font Awesome from public CDNs (floating versions, no
integrity), draw its index table with JavaScript, and print sample values from the data without
escaping them. Conveyor builds them with escaping views (:func:`site_config`, ``gx_views``), then
:func:`make_offline` rewrites every page: scripts, event handlers, ``javascript:`` URLs, frames,
forms and every asset or link that leaves the report are removed, GX's 4 MB ``static/`` folder
(fonts, logos) is replaced by one small stylesheet shipped beside this module, and ``index.html``
becomes a plain page listing the validation results, readable without JavaScript. The report
viewer serves them with a sandboxing Content-Security-Policy as well (``reports.viewer``).
Importing this module is cheap (no great_expectations, no jinja2).
"""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

STYLESHEET = Path(__file__).with_name("static") / "data_docs.css"
STYLESHEET_PATH = "static/conveyor/data_docs.css"  # inside the docs folder
VIEWS = "conveyor.reports.gx_views"

# Elements removed with everything inside them, and elements removed while their content stays.
_DROP_WITH_CONTENT = frozenset({"script", "template", "iframe", "frame", "frameset", "object", "embed", "applet"})
_DROP_TAG = frozenset(
    "link base meta form input button select option textarea xmp noembed noframes plaintext portal"
    " animate set animatemotion animatetransform".split()
)
_URL_ATTRIBUTES = frozenset({"href", "src", "xlink:href", "action", "formaction", "background", "poster", "data"})
_ALWAYS_DROPPED_ATTRIBUTES = frozenset({"srcset", "ping", "http-equiv"})
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_.:-]*$")
_TAG_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_SAFE_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]*$", re.IGNORECASE)
_CSS_URL = re.compile(r"url\s*\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_CSS_DANGER = re.compile(r"@import[^;]*;?|expression\s*\(|javascript:|behavior\s*:|-moz-binding", re.IGNORECASE)
_VOID = frozenset("area br col hr img source track wbr param link meta base input embed".split())


def site_config(docs_dir: Path) -> Any:  # a dict; GX types it narrower than it reads it
    """A GX Data Docs site that writes into ``docs_dir`` and renders data values escaped.

    :param docs_dir: the local folder the site is built in.
    """
    view = {"module_name": VIEWS, "class_name": "EscapingPageView"}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
        "site_section_builders": {section: {"view": view} for section in ("expectations", "validations", "profiling")},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    }


def is_local_url(url: str) -> bool:
    """Whether a URL stays inside the report: relative, without a scheme, a host or a backslash.

    :param url: an ``href``/``src`` value, as the page gave it.
    """
    cleaned = "".join(ch for ch in url if ch > " " and ch != "\x7f")  # browsers ignore these inside URLs
    if not cleaned or cleaned.startswith("#"):
        return True
    if cleaned.startswith(("/", "\\")) or "\\" in cleaned:
        return False
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", cleaned) is None


def clean_css(css: str) -> str:
    """CSS without imports, script-like constructs, or ``url()`` pointing outside the report.

    :param css: a stylesheet or a ``style`` attribute.
    """
    css = _CSS_DANGER.sub("", css)
    return _CSS_URL.sub(lambda m: m.group(0) if is_local_url(m.group(2)) else "none", css)


class _Sanitizer(HTMLParser):
    """Re-writes a page from its parsed tokens: only inert markup and report-local URLs are written out."""

    def __init__(self, stylesheet_href: str):
        super().__init__(convert_charrefs=False)
        self.stylesheet_href = stylesheet_href
        self.out: list[str] = []
        self.skipping: str | None = None  # the element whose content is being left out
        self.depth = 0  # how deep in elements of that name
        self.in_style = False
        self.linked = False

    def _link_stylesheet(self) -> None:
        if not self.linked:
            self.out.append(f'<link rel="stylesheet" href="{html.escape(self.stylesheet_href)}">')
            self.linked = True

    def _attributes(self, tag: str, attrs: list[tuple[str, str | None]]) -> str | None:
        """The attributes as HTML, or None when the element must go (an image from outside the report)."""
        parts = []
        for name, value in attrs:
            if not _ATTRIBUTE_NAME.match(name) or name.startswith("on") or name in _ALWAYS_DROPPED_ATTRIBUTES:
                continue
            value = value or ""
            if name in _URL_ATTRIBUTES and not is_local_url(value):
                if tag == "img" and name == "src" and _SAFE_DATA_IMAGE.match(value):
                    pass
                elif tag == "img" and name == "src":
                    return None
                else:
                    continue
            if name == "style":
                value = clean_css(value)
            parts.append(f' {name}="{html.escape(value, quote=True)}"')
        return "".join(parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, closed=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, closed=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], closed: bool) -> None:
        if self.skipping is not None:
            self.depth += tag == self.skipping and not closed
            return
        if tag in _DROP_WITH_CONTENT:
            if not closed and tag not in _VOID:
                self.skipping, self.depth = tag, 1
            return
        if tag == "meta" and any(name == "charset" for name, _ in attrs):
            self.out.append('<meta charset="utf-8">')
            return
        if tag in _DROP_TAG or not _TAG_NAME.match(tag):
            return
        attributes = self._attributes(tag, attrs)
        if attributes is None:
            return
        self.out.append(f"<{tag}{attributes}>")
        if tag == "style" and not closed:
            self.in_style = True

    def handle_endtag(self, tag: str) -> None:
        if self.skipping is not None:
            self.depth -= tag == self.skipping
            if self.depth == 0:
                self.skipping = None
            return
        if tag == "style":
            self.in_style = False
        if tag == "head":
            self._link_stylesheet()
        if tag in _DROP_WITH_CONTENT or tag in _DROP_TAG or tag in _VOID or not _TAG_NAME.match(tag):
            return
        self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.skipping is not None:
            return
        if self.in_style:
            self.out.append(clean_css(data).replace("<", "\\3c "))
        else:
            self.out.append(data.replace("<", "&lt;").replace(">", "&gt;"))

    def handle_entityref(self, name: str) -> None:
        if self.skipping is None:
            self.out.append(f"&{name};" if name.isalnum() else html.escape(f"&{name}"))

    def handle_charref(self, name: str) -> None:
        if self.skipping is None:
            self.out.append(f"&#{name};" if re.fullmatch(r"[xX]?[0-9A-Fa-f]+", name) else html.escape(f"&#{name}"))

    def handle_decl(self, decl: str) -> None:
        if decl.lower().startswith("doctype"):
            self.out.append("<!doctype html>")

    def handle_comment(self, data: str) -> None:  # comments (and IE's conditional ones) are left out
        return

    def handle_pi(self, data: str) -> None:
        return

    def unknown_decl(self, data: str) -> None:
        return


def sanitize_page(page: str, stylesheet_href: str) -> str:
    """An HTML page with everything active or remote taken out, linking the report's own stylesheet.

    :param page: the HTML as GX wrote it.
    :param stylesheet_href: the stylesheet's URL relative to this page.
    """
    sanitizer = _Sanitizer(stylesheet_href)
    sanitizer.feed(page)
    sanitizer.close()
    if not sanitizer.linked:
        sanitizer.out.insert(0, f'<link rel="stylesheet" href="{html.escape(stylesheet_href)}">')
    return "".join(sanitizer.out)


def _relative(target: str, page: PurePosixPath) -> str:
    """``target`` (a path inside the docs folder) as a URL relative to ``page`` (another one)."""
    ups = len(page.parent.parts)
    return "/".join([".."] * ups + [quote(part) for part in PurePosixPath(target).parts]) or "."


def make_offline(docs_dir: Path, success: bool | None = None, failures: Sequence[str] = ()) -> None:
    """Rewrite a GX Data Docs folder in place: safe pages, local stylesheet, a plain index page.

    :param docs_dir: the folder GX built the site in.
    :param success: the validation's verdict, shown on the index page (None: not shown).
    :param failures: one line per failed expectation, listed on the index page.
    """
    docs_dir = Path(docs_dir)
    shutil.rmtree(docs_dir / "static", ignore_errors=True)  # GX's fonts and logos; write_index copies ours
    for path in sorted(docs_dir.rglob("*.html")):
        relative = PurePosixPath(path.relative_to(docs_dir).as_posix())
        if relative == PurePosixPath("index.html"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        path.write_text(sanitize_page(text, _relative(STYLESHEET_PATH, relative)), encoding="utf-8")
    write_index(docs_dir, success, failures)


def write_index(docs_dir: Path, success: bool | None = None, failures: Sequence[str] = ()) -> Path:
    """(Re)write the site's ``index.html``: the verdict, the failures, a link to every page; its path.

    :param docs_dir: the Data Docs folder (after :func:`make_offline`, or a report folder without GX pages).
    :param success: the validation's verdict (None: not shown).
    :param failures: one line per failed expectation or check.
    """
    docs_dir = Path(docs_dir)
    if not (docs_dir / STYLESHEET_PATH).exists():
        (docs_dir / STYLESHEET_PATH).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STYLESHEET, docs_dir / STYLESHEET_PATH)
    pages = [
        PurePosixPath(path.relative_to(docs_dir).as_posix())
        for path in sorted(docs_dir.rglob("*.html"))
        if path.relative_to(docs_dir).as_posix() != "index.html"
    ]
    index = docs_dir / "index.html"
    index.write_text(index_page(pages, success, failures), encoding="utf-8")
    return index


_INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Data validation | Conveyor</title>
<link rel="stylesheet" href="{{ stylesheet }}">
</head>
<body class="conveyor-index">
<h1>Data validation</h1>
{% if success is not none %}
<p class="verdict {{ 'passed' if success else 'failed' }}">{{ 'Passed' if success else 'Failed' }}</p>
{% endif %}
{% if failures %}
<h2>Failed expectations</h2>
<ul class="failures">
{% for line in failures %}<li>{{ line }}</li>
{% endfor %}</ul>
{% endif %}
<h2>Validation results</h2>
{% if validations %}
<table>
<tr><th>expectation suite</th><th>run</th><th>run time</th><th>batch</th></tr>
{% for row in validations %}<tr><td>{{ row.suite }}</td><td>{{ row.run }}</td><td>{{ row.time }}</td>
<td><a href="{{ row.href }}">{{ row.batch }}</a></td></tr>
{% endfor %}</table>
{% else %}<p>No validation result was rendered.</p>{% endif %}
{% if suites %}
<h2>Expectation suites</h2>
<ul>{% for row in suites %}<li><a href="{{ row.href }}">{{ row.name }}</a></li>{% endfor %}</ul>
{% endif %}
</body>
</html>
"""


def index_page(pages: Sequence[PurePosixPath], success: bool | None, failures: Sequence[str]) -> str:
    """The site's ``index.html``: verdict, failures, links to every result and suite page (no JavaScript).

    :param pages: the site's pages, relative to its folder.
    :param success: the verdict, or None.
    :param failures: one line per failed expectation.
    """
    from jinja2 import Environment

    validations, suites = [], []
    for page in pages:
        href = "/".join(quote(part) for part in page.parts)
        parts = page.parts
        if parts[0] == "validations" and len(parts) >= 5:
            suite = "/".join(parts[1:-3])
            validations.append({"suite": suite, "run": parts[-3], "time": parts[-2], "batch": page.stem, "href": href})
        elif parts[0] == "expectations":
            suites.append({"name": PurePosixPath(*parts[1:]).with_suffix("").as_posix(), "href": href})
    environment = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(_INDEX).render(
        stylesheet=STYLESHEET_PATH,
        success=success,
        failures=list(failures),
        validations=sorted(validations, key=lambda row: (row["time"], row["href"]), reverse=True),
        suites=suites,
    )
