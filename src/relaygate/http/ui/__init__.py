"""The web UI: server-rendered pages (Jinja2, autoescaped), one small script of
our own, no third-party code in the browser. See ui/pages.py."""
