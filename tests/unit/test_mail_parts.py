"""mail_parts on hostile and malformed mail: it never raises, bounds what it
walks and shows, and decodes what a mail client would."""

from __future__ import annotations

import base64

import pytest

from relaygate import mail_parts


def _mime(*parts: bytes, boundary: str = "b1", extra: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return (
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n" + extra
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + boundary.encode()
        + b"\"\r\n\r\n" + body + b"--" + boundary.encode() + b"--\r\n"
    )  # fmt: skip


TEXT = b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello"
HTML = b"Content-Type: text/html\r\n\r\n<p>hi</p><script>alert(1)</script>"


def _file(name: bytes, data: bytes = b"PDFDATA", kind: bytes = b"application/pdf") -> bytes:
    return (
        b"Content-Type: " + kind + b"\r\nContent-Disposition: attachment; " + name
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data)
    )  # fmt: skip


def test_text_html_and_an_attachment() -> None:
    found = mail_parts.parts(_mime(TEXT, HTML, _file(b'filename="r.pdf"')))
    assert found.text == "hello"
    assert found.html is not None and "<script>" in found.html  # the sender's, for a sandbox
    [attached] = found.attachments
    assert (attached.filename, attached.content_type, attached.size) == (
        "r.pdf",
        "application/pdf",
        7,
    )
    assert mail_parts.attachment(_mime(TEXT, HTML, _file(b'filename="r.pdf"')), attached.index) == (
        attached,
        b"PDFDATA",
    )
    assert ("Subject", "s") in found.headers


def test_script_tags_in_headers_are_plain_text() -> None:
    raw = b"From: <script>x</script> <a@example.com>\r\nSubject: <img src=x onerror=1>\r\n\r\nbody"
    found = mail_parts.parts(raw)
    assert ("Subject", "<img src=x onerror=1>") in found.headers
    assert found.text == "body"


def test_encoded_words_and_non_ascii() -> None:
    raw = (
        "Subject: =?utf-8?b?" + base64.b64encode("Grüße ✉".encode()).decode() + "?=\r\n"
        "X-Raw: caf\u00e9\r\n\r\n"
    ).encode("utf-8") + "body é".encode()
    found = mail_parts.parts(raw)
    assert ("Subject", "Grüße ✉") in found.headers
    assert found.text is not None and found.text.startswith("body")


@pytest.mark.parametrize("charset", [b"x-unknown-charset", b"utf-7\x00", b"", b'"utf-8', b"utf-16"])
def test_bad_charsets_are_replaced_not_raised(charset: bytes) -> None:
    raw = b"Content-Type: text/plain; charset=" + charset + b"\r\n\r\n\xff\xfe caf\xe9"
    found = mail_parts.parts(raw)
    assert isinstance(found.text, str)


def test_rfc2231_names() -> None:
    name = b"filename*=utf-8''na%C3%AFve%20r%C3%A9sum%C3%A9.pdf"
    [attached] = mail_parts.parts(_mime(_file(name))).attachments
    assert attached.filename == "naïve résumé.pdf"
    bad = b"filename*=x-nope''%FF%FE.pdf"
    [attached] = mail_parts.parts(_mime(_file(bad))).attachments
    assert isinstance(attached.filename, str)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nno end",
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n\r\n----',
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n",
        b"Content-Type: message/rfc822\r\n\r\nnot a message",
        b"Content-Type: ;;;\r\nContent-Disposition: ;;=\r\n\r\nx",
        b"Content-ID: <" + b"a" * 100_000 + b">\r\n\r\nx",
        b"\x00\x01\x02: \xff\r\n\r\n\xff",
        b"Subject: =?utf-8?q?=FF=FE?= =?bogus?x?y?=\r\n\r\n",
    ],
)
def test_broken_mime_never_raises(raw: bytes) -> None:
    found = mail_parts.parts(raw)
    for attached in found.attachments:
        assert mail_parts.attachment(raw, attached.index) is not None


def test_huge_header_values_are_cut() -> None:
    found = mail_parts.parts(b"Subject: " + b"x" * 200_000 + b"\r\n\r\nbody")
    [value] = [v for n, v in found.headers if n == "Subject"]
    assert len(value) == mail_parts.MAX_HEADER_VALUE


def test_many_parts_are_bounded() -> None:
    raw = _mime(
        *[_file(b'filename="f%d.bin"' % i, b"x", b"application/octet-stream") for i in range(700)]
    )
    found = mail_parts.parts(raw)
    assert 0 < len(found.attachments) < mail_parts.MAX_PARTS
    last = found.attachments[-1]
    assert mail_parts.attachment(raw, last.index) == (last, b"x")
    assert mail_parts.attachment(raw, 10_000) is None and mail_parts.attachment(raw, -1) is None


def test_deep_nesting_does_not_recurse_forever() -> None:
    raw = TEXT
    for depth in range(1500):
        raw = _mime(raw, boundary=f"d{depth}")[
            len(b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n") :
        ]
    raw = b"Subject: deep\r\n" + raw
    found = mail_parts.parts(raw)  # returns; what it shows is bounded
    assert ("Subject", "deep") in found.headers


def test_inline_image_with_content_id() -> None:
    image = (
        b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"\x89PNG")
    )
    [attached] = mail_parts.parts(_mime(HTML, image)).attachments
    assert attached.inline and attached.content_id == "logo@x" and attached.size == 4


def test_html_as_text_for_a_terminal() -> None:
    markup = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<h1>Hello &amp; welcome</h1><p>Click <a href='https://x.test/a'>here</a>\n   now.</p>"
        "<ul><li>one</li><li>two</li></ul><script>alert(1)</script><p>bye</p></body></html>"
    )
    text = mail_parts.html_text(markup)
    assert text.startswith("Hello & welcome\n")
    assert "Click here <https://x.test/a> now." in text
    assert "- one" in text and "- two" in text and text.endswith("bye\n")
    assert "alert" not in text and "color" not in text and "<p>" not in text
    assert mail_parts.html_text("") == ""
    assert "broken" in mail_parts.html_text("<p>broken <b <<< </div>")
