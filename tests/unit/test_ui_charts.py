"""The dashboard's SVG bars: scaled, escaped, well-formed."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from relaygate.http.ui.charts import HEIGHT, bars


def test_bars_scale_to_the_largest_and_escape_text() -> None:
    svg = bars('<script>"x"</script>', ["<b>00:00</b>", "01:00", "02:00"], [0, 5, 10], "#123456")
    root = ET.fromstring(str(svg))  # well-formed XML: nothing broke out of an attribute
    rects = root.findall("{http://www.w3.org/2000/svg}rect") or root.findall("rect")
    heights = [float(r.get("height", "0")) for r in rects]
    assert heights[0] == 0 and heights[2] == HEIGHT - 2 and abs(heights[1] - heights[2] / 2) < 0.01
    assert "<script>" not in str(svg) and "&lt;script&gt;" in str(svg)
    assert rects[0].find("title") is not None
    assert rects[0].find("title").text == "<b>00:00</b>: 0"  # type: ignore[union-attr]


def test_no_values_and_all_zero_draw_no_bar() -> None:
    assert "<rect" not in str(bars("empty", [], [], "#000"))
    root = ET.fromstring(str(bars("zeros", ["a", "b"], [0, 0], "#000")))
    assert all(float(r.get("height", "1")) == 0 for r in root.iter("rect"))
