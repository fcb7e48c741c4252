// The Argon voice streaming spec's "TypeScript (Bun / Node.js)" example
// (shared/protocols/000_1537bbe3858d175f.txt), verbatim but for the lines marked "changed": it is
// plain JavaScript, run as an ES module (top-level await) with Node's global fetch and WebSocket;
// the API origin, bot token, space and channel come from the environment, so the test points it
// at the gateway's Argon listen role; it plays speech.wav (in the working directory) instead of
// music.mp3. It spawns ffmpeg, whose `-f opus` output is an Ogg Opus stream: each WebSocket
// message is a chunk of that stream cut wherever the pipe read ended, not one Opus packet.
import { spawn } from "child_process";

// 1. Get stream token
const resp = await fetch(`${process.env.ARGON_API_ORIGIN}/api/bot/IVoice/v1/StreamToken`, { // changed: was "https://api.argon.gl/api/bot/IVoice/v1/StreamToken"
  method: "POST",
  headers: {
    "Authorization": `Bot ${process.env.ARGON_BOT_TOKEN}`, // changed: was "Bot YOUR_TOKEN"
    "Content-Type": "application/json",
  },
  body: JSON.stringify({ spaceId: process.env.ARGON_SPACE_ID, channelId: process.env.ARGON_CHANNEL_ID }), // changed: was "..." and "..."
});
const { token, ingressUrl } = await resp.json();

// 2. Encode audio to Opus with ffmpeg (stereo, 48kHz)
const ffmpeg = spawn("ffmpeg", [
  "-i", "speech.wav", // changed: was "music.mp3"
  "-f", "opus",
  "-ar", "48000",
  "-ac", "2",
  "-frame_duration", "20",
  "pipe:1",
]);

// 3. Stream to ingress (stereo, 20ms frames)
const wsUrl = `${ingressUrl}?token=${token}&stereo=true&frame_duration_ms=20&track_name=music`;
const ws = new WebSocket(wsUrl);

ws.addEventListener("open", () => {
  ffmpeg.stdout.on("data", (chunk) => {
    ws.send(chunk);
  });
});

ffmpeg.on("close", () => ws.close());
