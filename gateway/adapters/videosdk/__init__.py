"""VideoSDK custom WebSocket ingest (spec: /work/shared/protocols/004_c69f0f37162481c1.txt).

`wire` is the sans-IO part shared by both roles: the JSON text frames (start / media / stop,
topic pub/sub, room lifecycle events) for the gateway as a device dialing VideoSDK
(`IngestClient`) and as a VideoSDK-compatible ingest server (`IngestServer`), the
``POST /v2/ingest/sessions`` request and response shapes, and webhook signature checks.
"""
