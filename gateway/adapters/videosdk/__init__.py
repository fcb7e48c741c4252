"""VideoSDK custom WebSocket ingest (spec: /work/shared/protocols/004_c69f0f37162481c1.txt).

By component:

- `frames`: the JSON text frames of the ingest WebSocket (start / media / stop, topic pub/sub,
  room lifecycle events) for the gateway as a device dialing VideoSDK (`IngestClient`) and as
  a VideoSDK-compatible ingest server (`IngestServer`); sans-IO.
- `sessions`: ``POST /v2/ingest/sessions`` request and response shapes for both sides, the
  wsUrl and its single-use ref, the ``Authorization`` header; sans-IO.
- `webhooks`: signed lifecycle webhooks: signature checks and bodies (sans-IO), and the
  gateway's ``POST /webhooks/videosdk`` endpoint (`VideosdkWebhooks`).
- `room`: the listen role's rooms (participants, topics, who is sent what), pure.
- `dial`: `VideosdkDial`, the gateway as a device streaming into a VideoSDK room.
- `listen`: `VideosdkListen` and `VideosdkListenService`, the gateway as an ingest server.
- `endpoint`: the endpoints in one place (what the registry imports).
"""
