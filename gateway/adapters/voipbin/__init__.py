"""VoIPBIN call / conference media stream (spec: /work/shared/protocols/002_fcf346ba8b7becb9.txt).

`wire` is the sans-IO framing shared by both roles (rtp, sln and audiosocket encapsulations).
"""
