"""Service adapters: one package per service, dial and listen side by side.

Each package holds a sans-IO `wire` module (bytes in, typed events out; events in, bytes out;
no sockets, no clocks, no DSP) and the thin trio modules that own the connections
(DESIGN.md, "The picture").
"""
