"""Onward delivery: what happens to a spooled message (capture, smarthost, MX),
and what is done to it on the way out (DKIM signing, bounces)."""
