"""rankscope.report.blocks: the markdown subset of the document's text, as HTML."""

from __future__ import annotations

from rankscope.report.blocks import inline_html


def test_inline_html():
    assert (
        inline_html("a **b** *c* `d*e` \\*f\\* <g> & h")
        == "a <strong>b</strong> <em>c</em> <code>d*e</code> *f* &lt;g&gt; &amp; h"
    )
    assert inline_html("2 * 3 = 6") == "2 * 3 = 6"  # an unmatched star is a star
    assert inline_html("**qk\\_norm\\|x**") == "<strong>qk_norm|x</strong>"
