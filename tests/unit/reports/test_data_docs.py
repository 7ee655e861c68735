"""Great Expectations Data Docs as Conveyor writes them: data values escaped, nothing active, nothing remote.

The first tests render real Data Docs with GX (``validate_frame``) from a table holding script
injections; the others feed the sanitizer pages built to break it.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from conveyor.reports.data_docs import STYLESHEET_PATH, is_local_url, make_offline, sanitize_page, write_index

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"
ESCAPED_IMG = "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
SUITE = {
    "name": "evil",
    "expectations": [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "plan", "value_set": ["basic", "pro"]}},
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "plan", "regex": "^[a-z]+$"}},
        {"type": "expect_column_distinct_values_to_be_in_set", "kwargs": {"column": "plan", "value_set": ["basic"]}},
        {"type": "expect_column_most_common_value_to_be_in_set", "kwargs": {"column": "plan", "value_set": ["x"]}},
        {"type": "expect_table_columns_to_match_ordered_list", "kwargs": {"column_list": ["plan"]}},
    ],
}


class Elements(HTMLParser):
    """Every element and attribute of a page, as a browser would tokenise it."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def elements(page: str) -> Elements:
    parsed = Elements()
    parsed.feed(page)
    parsed.close()
    return parsed


def assert_inert_and_local(page: str) -> None:
    """No script, no event handler, no javascript: URL, no asset or link outside the report folder."""
    parsed = elements(page)
    for tag, attrs in parsed.tags:
        active = tag in {"script", "iframe", "object", "embed", "base", "form", "meta"}
        assert not active or attrs == {"charset": "utf-8"}, (tag, attrs)
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name, value)
            if name in {"href", "src", "action", "xlink:href", "srcset"}:
                assert is_local_url(value or ""), (tag, name, value)
        if tag == "link":
            assert attrs.get("rel") == "stylesheet" and is_local_url(attrs["href"])
    for css in parsed.styles + [a.get("style") or "" for _, a in parsed.tags]:
        assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", css, re.IGNORECASE), css
        assert "@import" not in css
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "javascript:" not in page.lower()


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    from conveyor.data.validation import validate_frame
    from conveyor.reports import data_docs

    folder = tmp_path_factory.mktemp("docs")
    frame = pd.DataFrame({"plan": ["basic", SCRIPT, IMG, SCRIPT], f"n{SCRIPT}": [1, 2, 3, 4]})
    outcome = validate_frame(frame, SUITE, run_name="evil-run", docs_dir=folder, docs=data_docs)
    assert not outcome.success
    return folder


def pages(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): path.read_text(encoding="utf-8") for path in folder.rglob("*.html")}


def test_injected_values_appear_only_escaped_in_the_validation_report(docs):
    rendered = pages(docs)
    (result,) = [name for name in rendered if name.startswith("validations/")]
    for name, page in rendered.items():
        assert SCRIPT not in page, name
        assert "<img src=x" not in page, name
        assert "onerror=alert(1)>" not in page.replace(ESCAPED_IMG, ""), name
    assert ESCAPED_SCRIPT in rendered[result]  # the sampled unexpected values, readable as text
    assert ESCAPED_IMG in rendered[result]
    assert ESCAPED_SCRIPT in rendered["index.html"]  # in the failures listed on the index page


def test_rendered_docs_are_inert_and_load_nothing_from_the_network(docs):
    for name, page in pages(docs).items():
        try:
            assert_inert_and_local(page)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        assert "http://" not in page and "https://" not in page, name


def test_docs_ship_their_own_stylesheet_instead_of_gx_static_assets(docs):
    files = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*") if p.is_file() and p.suffix != ".html")
    assert files == [STYLESHEET_PATH]  # GX's fonts and logos (4 MB a run) are gone
    css = (docs / STYLESHEET_PATH).read_text()
    assert "http" not in css and "@import" not in css
    for name, page in pages(docs).items():
        links = [a["href"] for tag, a in elements(page).tags if tag == "link"]
        assert len(links) == 1, name
        assert (docs / name).parent.joinpath(links[0]).resolve() == (docs / STYLESHEET_PATH).resolve(), name


def test_index_page_lists_the_results_without_javascript(docs):
    index = (docs / "index.html").read_text()
    parsed = elements(index)
    links = [a["href"] for tag, a in parsed.tags if tag == "a"]
    result = [link for link in links if link.startswith("validations/evil/evil-run/")]
    assert len(result) == 1 and (docs / result[0]).is_file()
    assert "expectations/evil.html" in links
    assert '<p class="verdict failed">Failed</p>' in index
    assert "expect_column_values_to_be_in_set" in index


def test_write_index_shows_the_verdict_of_every_check(tmp_path):
    index = write_index(tmp_path, False, [f"rule 'label column exists': column {SCRIPT} is missing"])
    page = index.read_text()
    assert SCRIPT not in page and ESCAPED_SCRIPT in page
    assert "No validation result was rendered." in page
    assert (tmp_path / STYLESHEET_PATH).is_file()
    assert_inert_and_local(page)


ATTACKS = [
    SCRIPT,
    "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "<scr<script>ipt>alert(1)</script>",
    IMG,
    "<a href='javascript:alert(1)'>x</a>",
    "<a href=' java\tscript:alert(1)'>x</a>",
    "<a href='JaVaScRiPt&#58;alert(1)'>x</a>",
    "<a href='https://evil.example/'>x</a>",
    "<img src='//evil.example/x.png'>",
    "<img src='/\\evil.example/x.png'>",
    "<iframe src='x.html'><script>alert(1)</script></iframe>",
    "<object data='x.swf'></object><embed src='x.swf'>",
    "<svg><script>alert(1)</script><a xlink:href='javascript:alert(1)'>x</a></svg>",
    "<svg><animate attributeName=href to=javascript:alert(1) /></svg>",
    "<svg onload=alert(1)>",
    "<style>@import url(https://evil.example/x.css); body{background:url('https://evil.example/x')}</style>",
    '<div style="background:url(https://evil.example/x);width:expression(alert(1))">x</div>',
    "<base href='https://evil.example/'>",
    "<meta http-equiv='refresh' content='0;url=https://evil.example/'>",
    "<form action='https://evil.example/'><button formaction='https://evil.example/'>x</button></form>",
    "<link rel=stylesheet href='https://evil.example/x.css'>",
    "<!--<script>alert(1)</script>--><![CDATA[<script>alert(1)</script>]]>",
    "<template><script>alert(1)</script></template>",
    "<img src=x srcset='https://evil.example/x.png 2x'>",
    "<div onmouseover='alert(1)' data-x=\"a\"></div>",
    "<style></style><script>alert(1)</script>",
    "<title></title><script>alert(1)</script>",
    "<x onclick=alert(1)>x</x>",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_sanitizer_leaves_nothing_active_or_remote(attack):
    page = f"<!doctype html><html><head><title>t</title></head><body><p>{attack}</p></body></html>"
    clean = sanitize_page(page, "static/conveyor/data_docs.css")
    assert_inert_and_local(clean)
    assert "<script" not in clean.lower()
    # what the sanitizer writes is stable: cleaning it again changes nothing
    assert sanitize_page(clean, "static/conveyor/data_docs.css") == clean


def test_the_sanitizer_keeps_text_tables_and_local_links():
    page = (
        "<html><head><style>td { color: red }</style></head><body><h1 class='x'>Result &amp; more</h1>"
        "<table><tr><td id='c1'>&lt;b&gt; 3 &lt; 4</td></tr></table><a href='../index.html#top'>home</a>"
        "<img src='plot.png' alt='a plot'><img src='data:image/png;base64,iVBORw0KGgo='></body></html>"
    )
    clean = sanitize_page(page, "../static/conveyor/data_docs.css")
    assert "<style>td { color: red }</style>" in clean
    assert '<h1 class="x">Result &amp; more</h1>' in clean
    assert '<td id="c1">&lt;b&gt; 3 &lt; 4</td>' in clean
    assert '<a href="../index.html#top">home</a>' in clean
    assert '<img src="plot.png" alt="a plot">' in clean
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in clean
    assert clean.index('<link rel="stylesheet" href="../static/conveyor/data_docs.css">') < clean.index("</head>")


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("plot.png", True),
        ("../index.html#x", True),
        ("#top", True),
        ("", True),
        ("https://cdn.example/x.js", False),
        ("//cdn.example/x.js", False),
        ("/etc/passwd", False),
        ("\\\\host\\share", False),
        ("java\nscript:alert(1)", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("mailto:a@b", False),
    ],
)
def test_is_local_url(url, local):
    assert is_local_url(url) is local


def test_make_offline_on_a_folder_gx_wrote(tmp_path):
    """The shape GX writes (static assets, CDN scripts, an index drawn by JavaScript), rewritten in place."""
    (tmp_path / "static" / "fonts").mkdir(parents=True)
    (tmp_path / "static" / "fonts" / "x.otf").write_bytes(b"font")
    page = tmp_path / "validations" / "s" / "run" / "20260101T000000.000000Z" / "batch.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        "<html><head><script src='https://code.jquery.com/jquery-3.7.1.min.js'></script>"
        "<link rel='stylesheet' href='https://maxcdn.bootstrapcdn.com/bootstrap.min.css'></head>"
        f"<body><td>{SCRIPT}</td><script>$('#t').bootstrapTable()</script></body></html>"
    )
    (tmp_path / "index.html").write_text("<html><script>$('#t').bootstrapTable({data: []})</script></html>")
    make_offline(tmp_path, True, [])
    assert not (tmp_path / "static" / "fonts").exists()
    text = page.read_text()
    assert "<script" not in text and "http" not in text and "bootstrapTable" not in text
    assert '<link rel="stylesheet" href="../../../../static/conveyor/data_docs.css">' in text
    index = (tmp_path / "index.html").read_text()
    assert '<a href="validations/s/run/20260101T000000.000000Z/batch.html">batch</a>' in index
    assert '<p class="verdict passed">Passed</p>' in index
