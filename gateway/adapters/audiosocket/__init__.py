"""Asterisk AudioSocket over TCP (Asterisk documentation "AudioSocket",
https://docs.asterisk.org/Configuration/Channel-Drivers/AudioSocket/).

`wire` is the sans-IO framing (a stream parser and the serializers), shared with VoIPBIN's
audiosocket encapsulation; `server` is the listen service on `server.audiosocket` (routing by
UUID); `endpoint` holds the dial and listen endpoints.
"""
