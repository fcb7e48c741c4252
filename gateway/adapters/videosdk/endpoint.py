"""The VideoSDK adapter's endpoints: `VideosdkDial` (the gateway as a device streaming into a
VideoSDK room; gateway/adapters/videosdk/dial.py), `VideosdkListen` and its
`VideosdkListenService` (a VideoSDK-compatible ingest server: session REST, ingest WebSocket,
rooms; gateway/adapters/videosdk/listen.py) and `VideosdkWebhooks` (signed lifecycle webhooks;
gateway/adapters/videosdk/webhooks.py). Spec: /work/shared/protocols/004_c69f0f37162481c1.txt."""

from gateway.adapters.videosdk.dial import INGEST_REJECTED, VideosdkDial
from gateway.adapters.videosdk.listen import PONG_TIMEOUT_S, VideosdkListen, VideosdkListenService
from gateway.adapters.videosdk.webhooks import WEBHOOK_PATH, VideosdkWebhooks

__all__ = [
    "INGEST_REJECTED",
    "PONG_TIMEOUT_S",
    "VideosdkDial",
    "VideosdkListen",
    "VideosdkListenService",
    "VideosdkWebhooks",
    "WEBHOOK_PATH",
]
