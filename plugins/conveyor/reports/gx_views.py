"""Great Expectations page views that escape the data they show (used through ``data_docs.site_config``).

GX 1.x renders a result's sample unexpected values, observed values and table cells into its
pages as raw HTML: its templates are ``.j2`` files, which its ``select_autoescape(["html", "xml"])``
leaves unescaped, and only string template parameters are escaped. A drop holding
``<script>alert(1)</script>`` then puts a live script into the validation report. These views escape
every plain value a content block carries (a cell, a list item, a parameter that is not a string)
while GX's own markup (content blocks, their templates, styling) stays HTML.

GX imports this module by name when it builds Data Docs; importing it imports great_expectations.
"""

from __future__ import annotations

import html
from typing import Any

from great_expectations.render.components import RenderedComponentContent
from great_expectations.render.view import DefaultJinjaPageView
from jinja2 import pass_context


def escape_value(value: Any) -> Any:
    """A value for a page: numbers and None as they are, anything else as escaped text.

    :param value: a plain value a content block or a string template carries.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return html.escape(value if isinstance(value, str) else str(value), quote=True)


class _EscapingView:
    """Overrides of ``DefaultJinjaView``: plain values are data and are escaped; content blocks render as GX's."""

    @pass_context
    def render_content_block(
        self,
        jinja_context: Any,
        content_block: Any,
        index: Any = None,
        content_block_id: Any = None,
        render_to_markdown: bool = False,
    ) -> Any:
        """GX's rendering of a content block, with every plain (non-block) value escaped first.

        :param jinja_context: the template's context.
        :param content_block: a content block, a list of them, or a plain value.
        :param index: the block's position, as GX passes it.
        :param content_block_id: the block's element id, as GX passes it.
        :param render_to_markdown: GX's markdown mode (values are left as they are).
        """
        if not render_to_markdown:
            content_block = _escaped(content_block)
        return super().render_content_block(  # type: ignore[misc]
            jinja_context, content_block, index, content_block_id, render_to_markdown
        )

    @staticmethod
    def _escape_template_param_value(value: Any) -> Any:
        return escape_value(value)


def _is_block(value: Any) -> bool:
    return isinstance(value, RenderedComponentContent) or (isinstance(value, dict) and "content_block_type" in value)


def _escaped(content_block: Any) -> Any:
    """The content block with its plain values (itself, or a list's items) escaped; blocks untouched."""
    if content_block is None or _is_block(content_block):
        return content_block
    if isinstance(content_block, list):
        return [item if _is_block(item) else escape_value(item) for item in content_block]
    return escape_value(content_block)


class EscapingPageView(_EscapingView, DefaultJinjaPageView):
    """``DefaultJinjaPageView`` (validation results, expectation suites) with data values escaped."""
