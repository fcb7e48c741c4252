"""Voice-agent SDK WebSocket (spec: /work/shared/protocols/003_300445899f8ad283.txt).

`wire` is the sans-IO part: the ``/api/v1/sdk/token`` REST shapes, the token handshake and
control messages of the WebSocket (`AgentClient` when the gateway dials an agent service,
`AgentServer` when it serves browsers running the spec's page), and PCM16 16 kHz audio that
keeps its sample alignment across odd-sized binary messages.
"""
