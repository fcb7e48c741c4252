"""Argon bot voice ingress (specs: /work/shared/protocols/000_1537bbe3858d175f.txt, 001_bf359231651c17d3.txt).

`wire` is the sans-IO part: Opus packet validation (RFC 6716), the ingress URL and its query,
the LiveKit-style stream JWT, and the StreamToken REST request / response shapes.
"""
