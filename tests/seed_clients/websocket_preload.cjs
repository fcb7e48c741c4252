// Preloaded (node --require) by tests/seed_clients.py for a Node without a global WebSocket
// (Debian's nodejs 18; Node 20 has it only behind --experimental-websocket, which the helper
// prefers): the Argon example uses the browser-style global, so give it the `ws` package's
// WebSocket (addEventListener, send, close). NODE_PATH=/usr/share/nodejs finds Debian's node-ws.
if (typeof globalThis.WebSocket === "undefined") {
  globalThis.WebSocket = require("ws");
}
