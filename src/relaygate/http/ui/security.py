"""What keeps hostile mail and other sites from doing anything in the web UI:
the headers every page carries, the stricter ones for a message's HTML, the
session cookie's flags, and the CSRF and Origin checks on every form."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "relaygate_session"

# Our pages: our own script and style only; nothing inline, nothing remote.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def mail_csp(remote_images: bool) -> str:
    """A captured message's HTML: no script at all (CSP sandbox without
    allow-scripts, on top of the iframe's sandbox), inline styles (mail needs
    them), images only from the message itself unless the reader asked."""
    images = "data: https: http:" if remote_images else "data:"
    return (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src {images}; font-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox"
    )


def harden(response: Response, csp: str = PAGE_CSP) -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null"
    # on our own form posts, and the Origin check could not tell them from others.
    # A message's HTML (csp != PAGE_CSP) leaks nothing to the hosts it names.
    response.headers["Referrer-Policy"] = "same-origin" if csp == PAGE_CSP else "no-referrer"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    if "frame-ancestors 'none'" in csp:
        response.headers["X-Frame-Options"] = "DENY"
    return response


def same_origin(request: Request) -> bool:
    """A form post must come from our own pages. Browsers send Origin on every
    POST; a post without it (an old client, curl) passes on the CSRF token alone."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def set_session_cookie(response: Response, token: str, *, secure: bool, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        secure=secure,
        samesite="strict",
    )


def clear_session_cookie(response: Response, *, secure: bool) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, secure=secure, samesite="strict")
