"""gateway: a real-time audio gateway joining VoIPBIN, Argon, VideoSDK and voice-agent WebSockets.

The Python package holds everything: `gateway.codecs` (formats and the codec graph),
`gateway.adapters` (one module per service, dial and listen side by side),
`gateway.config` (the YAML schema), `gateway.route` (media clock, playout, mixing) and
`gateway.daemon` (routes, listen servers, signals).
"""

__version__ = "0.1.0"
