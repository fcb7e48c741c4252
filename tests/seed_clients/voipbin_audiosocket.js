// The VoIPBIN media stream spec's "Node.js Example (AudioSocket)"
// (shared/protocols/002_fcf346ba8b7becb9.txt), verbatim but for the lines marked "changed":
// the URL's origin, call id and token come from the environment, so the test points it at the
// gateway's VoIPBIN listen role. Its files (audio.pcm, received_audio.pcm) are the spec's own
// names, relative to the working directory the test runs it in.
const WebSocket = require('ws');
const fs = require('fs');

const callId = process.env.VOIPBIN_CALL_ID; // changed: was '652af662-eb45-11ee-b1a5-6fde165f9226'
const token = process.env.VOIPBIN_TOKEN; // changed: was '<YOUR_AUTH_TOKEN>'
const wsUrl = `${process.env.VOIPBIN_MEDIA_URL}/v1.0/calls/${callId}/media_stream?encapsulation=audiosocket&token=${token}`; // changed: was wss://api.voipbin.net

const ws = new WebSocket(wsUrl);

ws.on('open', function() {
  console.log('AudioSocket connected');

  // Send audio file
  const audioFile = fs.readFileSync('audio.pcm');

  // Send in chunks (20ms = 320 bytes for 16-bit 8kHz mono)
  const chunkSize = 320;
  for (let i = 0; i < audioFile.length; i += chunkSize) {
    const chunk = audioFile.slice(i, i + chunkSize);
    ws.send(chunk);
  }
});

ws.on('message', function(data) {
  // Receive audio from call
  console.log(`Received ${data.length} bytes`);

  // Save received audio
  fs.appendFileSync('received_audio.pcm', data);
});

ws.on('error', function(error) {
  console.error('Error:', error);
});

ws.on('close', function() {
  console.log('AudioSocket closed');
});
