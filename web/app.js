// The duplex browser client: WebRTC to `duplex serve`, the conversation as the server reports it on
// the "events" data channel, and latency as the browser itself measures it from WebRTC stats.
// Plain JavaScript, no build step. State for tests and curious people lives in `window.duplex`.
"use strict";

const $ = (id) => document.getElementById(id);
const MIC_LOUD = 0.05;    // microphone RMS above which the user counts as speaking (above room noise)
const AGENT_LOUD = 0.01;  // agent-audio RMS above which the agent counts as audible
const STATS_MS = 50;      // getStats polling period (link figures)
const TAP_MS = 10;        // how often the audio taps are read (the latency figures' resolution)
const BARGE_MS = 50;      // loud microphone this long, while the agent speaks, mutes it here
const KEEP_MESSAGES = 2000;  // data-channel messages kept for inspection (the oldest go first)
const KEEP_TURNS = 200;      // conversation turns shown; older ones leave the page
const KEEP_ROWS = 100;       // latency rows shown
const RETRY_S = [1, 2, 4, 8, 15];  // waits before each reconnection try after a failure

const duplex = window.duplex = {
  pc: null, dc: null, pcId: null, secret: null, stream: null,
  token: new URLSearchParams(location.search).get("token"),  // the server's --token, if it has one
  messages: [],              // every data-channel message, in order
  turns: new Map(),          // item_id -> user utterance view
  replies: new Map(),        // response_id -> agent reply view
  latency: new Map(),        // response_id -> {server: {...}, browser: seconds}
  stats: {micLevel: 0, agentLevel: 0, bytesReceived: 0, audioLevel: 0, peakAudioLevel: 0,
          totalAudioEnergy: 0, jitterBufferS: 0, packetsLost: 0},
  micLoudAt: 0,              // Date.now() of the last loud microphone tap reading
  taps: null,                // WebAudio analysers on the microphone and on the agent's audio as played
  awaiting: null,            // {id} of the reply whose first audio we are waiting to hear
  wanted: false,             // the user asked to be connected (a failure then reconnects)
  attempts: 0,               // reconnection tries since the last good connection
  reconnects: 0,             // reconnections made (for tests)
  resumes: 0,                // connections that continued an earlier conversation (for tests)
  resumed: false,            // the current connection did
  agentState: "-",           // as the server last reported it
  loudSince: 0,              // Date.now() when the microphone became loud (0: it is not)
  localPause: null,          // {onsetAt, mutedAt, id}: the page muted the agent at the user's speech onset
  bargeIns: [],              // browser-measured barge-ins: {id, seconds} (speech onset to output muted)
  errors: [],                // the last 50 errors shown, oldest first (the page shows only the latest)
};
let statsTimer = null, tapTimer = null, retryTimer = null, lastStats = null, pendingCandidates = [], candidateTimer = null, lastReport = 0;

function showError(text) {
  if (text && duplex.errors.push(text) > 50) duplex.errors.shift();
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

function setConnection(text, cls) {
  const el = $("connection");
  el.textContent = text;
  el.className = "badge " + (cls || "");
}

function setAgentState(state) {
  duplex.agentState = state;
  if (duplex.localPause && state === "speaking" && duplex.localPause.confirmed) unmuteAgent();  // resumed
  const el = $("agent-state");
  el.textContent = "agent: " + state;
  el.className = "badge state-" + state;
}

// -- connection -------------------------------------------------------------------------------------

function connect() {
  duplex.wanted = true;
  duplex.attempts = 0;
  open();
}

// A failure while the user wants to be connected: say what happened and try again, waiting longer
// each time; the Disconnect button stops it.
function failed(reason) {
  disconnect(reason);
  if (!duplex.wanted) return;
  if (duplex.attempts >= RETRY_S.length) {
    duplex.wanted = false;
    showError(reason + " Gave up reconnecting; press Connect to try again.");
    return;
  }
  const wait = RETRY_S[duplex.attempts++];
  setConnection("reconnecting in " + wait + " s...");
  $("connect").disabled = true;
  $("disconnect").disabled = false;
  retryTimer = setTimeout(() => { retryTimer = null; duplex.reconnects++; open(); }, wait * 1000);
}

async function open() {
  $("connect").disabled = true;
  setConnection("asking for the microphone...");
  try {
    duplex.stream = await navigator.mediaDevices.getUserMedia({
      audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1},
    });
  } catch (err) {
    showError("No microphone: " + err.message + ". Allow the microphone for this page and try again.");
    setConnection("disconnected");
    $("connect").disabled = false;
    return;
  }
  const pc = duplex.pc = new RTCPeerConnection({iceServers: []});
  pc.addTransceiver(duplex.stream.getAudioTracks()[0], {direction: "sendrecv", streams: [duplex.stream]});
  const dc = duplex.dc = pc.createDataChannel("events", {ordered: true});
  dc.onmessage = (e) => { try { onMessage(JSON.parse(e.data)); } catch (err) { console.error(err); } };
  dc.onopen = () => { duplex.attempts = 0; };  // a good connection: the next failure starts the waits over
  dc.onclose = () => {
    if (duplex.dc === dc) failed("The server closed the session (its event channel closed).");
  };
  pc.ontrack = (e) => {
    const audio = $("agent-audio");
    audio.srcObject = e.streams[0] || new MediaStream([e.track]);
    audio.play().catch((err) => showError("Cannot play the agent's voice: " + err.message));
    startTaps(audio.srcObject);
  };
  pc.onicecandidate = (e) => {
    if (!e.candidate || !e.candidate.candidate) return;
    pendingCandidates.push(e.candidate);
    if (!candidateTimer) candidateTimer = setTimeout(flushCandidates, 100);
  };
  pc.onconnectionstatechange = () => {
    const s = pc.connectionState;
    setConnection(s, s === "connected" ? "connected" : (s === "failed" ? "failed" : ""));
    if (duplex.pc !== pc) return;
    if (s === "failed") failed("The connection failed.");
    else if (s === "disconnected") checkSession(pc);
    else if (s === "closed") disconnect("");
  };
  setConnection("connecting...");
  try {
    await pc.setLocalDescription(await pc.createOffer());
    const res = await fetch("api/offer", {
      method: "POST", headers: apiHeaders(),
      // a reconnection (or a reload of this tab) continues the conversation while the server keeps it
      body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer", pc_id: null, resume: resumeToken()}),
    });
    const body = await res.json().catch(() => ({error: res.statusText}));
    if (!res.ok) throw new Error(body.error || ("HTTP " + res.status));
    duplex.pcId = body.pc_id;
    duplex.secret = body.secret;  // only this page can renegotiate this connection or add candidates
    keepResumeToken(body.resume_token);
    duplex.resumed = !!body.resumed;
    if (body.resumed) duplex.resumes++;
    if (body.resume_refused) console.info(body.resume_refused);
    await pc.setRemoteDescription({sdp: body.sdp, type: body.type});
    flushCandidates();
  } catch (err) {
    failed("Could not connect: " + err.message + ".");
    return;
  }
  $("disconnect").disabled = false;
  $("mute").disabled = false;
  statsTimer = setInterval(pollStats, STATS_MS);
}

// The token that lets the next connection of this tab continue this conversation (see the server's
// transport/resume.py): kept in sessionStorage, so a reload continues too; Disconnect forgets it.
function resumeToken() {
  try { return sessionStorage.getItem("duplex.resume"); } catch (err) { return null; }
}

function keepResumeToken(token) {
  try {
    if (token) sessionStorage.setItem("duplex.resume", token);
    else sessionStorage.removeItem("duplex.resume");
  } catch (err) { /* storage refused: reconnections start new conversations */ }
}

function apiHeaders() {
  const h = {"Content-Type": "application/json"};
  if (duplex.token) h.Authorization = "Bearer " + duplex.token;
  return h;
}

// Candidates for this page's connection (none: only asks whether the server still has it).
function patchCandidates(candidates) {
  return fetch("api/offer", {method: "PATCH", headers: apiHeaders(),
                             body: JSON.stringify({pc_id: duplex.pcId, secret: duplex.secret, candidates})});
}

async function flushCandidates() {
  candidateTimer = null;
  if (!duplex.pcId || !pendingCandidates.length) return;
  const candidates = pendingCandidates.splice(0).map((c) => ({
    candidate: c.candidate, sdp_mid: c.sdpMid, sdp_mline_index: c.sdpMLineIndex,
  }));
  try {
    const res = await patchCandidates(candidates);
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error || ("HTTP " + res.status));
    }
  } catch (err) {
    showError("Could not send network candidates to the server: " + err.message);
  }
}

// A connection gone quiet may be a network blip, or its server may be gone (in a cluster, a replica
// that died; the browser's own checks take up to half a minute to give up): ask the server, and
// start over at once when it no longer has the session.
async function checkSession(pc) {
  if (!duplex.pcId) return;
  let res;
  try {
    res = await patchCandidates([]);
  } catch (err) {
    if (duplex.pc === pc) failed("Lost the server (" + err.message + ").");
    return;
  }
  if (duplex.pc !== pc || pc.connectionState === "connected") return;
  if (res.status === 404 || res.status === 503) {
    const body = await res.json().catch(() => ({}));
    failed("The server lost this session: " + (body.error || ("HTTP " + res.status)) + ".");
  }
}

function disconnect(reason) {
  if (retryTimer) clearTimeout(retryTimer);
  retryTimer = null;
  if (statsTimer) clearInterval(statsTimer);
  if (tapTimer) clearInterval(tapTimer);
  statsTimer = tapTimer = null;
  if (duplex.taps) duplex.taps.ctx.close().catch(() => {});
  duplex.taps = null;
  const dc = duplex.dc, pc = duplex.pc;
  duplex.dc = duplex.pc = null;  // (their close handlers now see they are not the current ones)
  if (dc) dc.close();
  if (pc) pc.close();
  if (duplex.stream) duplex.stream.getTracks().forEach((t) => t.stop());
  duplex.pc = duplex.dc = duplex.stream = null;
  duplex.pcId = duplex.secret = null;
  pendingCandidates = [];
  $("agent-audio").srcObject = null;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("mute").disabled = true;
  setConnection("disconnected");
  setAgentState("-");
  if (reason) showError(reason);
}

// -- events from the server -------------------------------------------------------------------------

function onMessage(m) {
  m.received = Date.now();
  duplex.messages.push(m);
  if (duplex.messages.length > KEEP_MESSAGES) duplex.messages.splice(0, duplex.messages.length - KEEP_MESSAGES);
  switch (m.type) {
    case "input_audio_buffer.speech_started":
      break;  // the bubble appears with the first recognised words (a cough gets none)
    case "input_audio_buffer.speech_stopped":
      break;
    case "conversation.item.input_audio_transcription.delta":
      renderUser(userTurn(m.item_id), m.stable, m.unstable, false);
      break;
    case "conversation.item.input_audio_transcription.completed":
      renderUser(userTurn(m.item_id), m.transcript, "", true);
      break;
    case "response.created":
      reply(m.response_id);
      duplex.awaiting = {id: m.response_id};
      break;
    case "response.audio_transcript.delta": {
      const r = reply(m.response_id);
      r.text += m.delta;
      renderReply(r);
      break;
    }
    case "response.audio.words": {
      const r = reply(m.response_id);
      r.rate = m.sample_rate;
      r.words.push(...m.words);
      renderReply(r);
      break;
    }
    case "response.audio.progress": {
      const r = reply(m.response_id);
      r.played = m.played;
      renderReply(r);
      break;
    }
    case "agent.interrupted":
    case "response.done": {
      if (m.type === "agent.interrupted") unmuteAgent();  // the server dropped the rest of that reply
      const r = reply(m.response_id);
      if (m.type === "response.done") {
        r.done = true;
        r.text = m.transcript || r.text;
      }
      if (m.interrupted || m.type === "agent.interrupted") {
        r.interrupted = true;
        r.heard = m.heard;
      }
      renderReply(r);
      if (r.done && !r.text.trim()) {  // dropped before the LLM said anything: nothing to show
        r.li.remove();
        duplex.replies.delete(r.id);
      }
      if (m.type === "response.done" && duplex.awaiting && duplex.awaiting.id === m.response_id) duplex.awaiting = null;
      break;
    }
    case "agent.state":
      setAgentState(m.state);
      break;
    case "agent.barge_in":
      if (duplex.localPause) duplex.localPause.confirmed = true;  // the server heard it too
      else if (duplex.agentState === "speaking") muteHere(Date.now(), true);
      setAgentState("paused");
      break;
    case "agent.metric":
      onMetric(m);
      break;
    case "error":
      showError("Server: " + m.error.message);
      break;
  }
}

function userTurn(itemId) {
  let t = duplex.turns.get(itemId);
  if (!t) {
    const li = document.createElement("li");
    li.className = "turn user tentative";
    li.dataset.item = itemId;
    li.innerHTML = '<span class="who">you</span><span class="text"></span>';
    $("transcript").appendChild(li);
    t = {li, final: false};
    duplex.turns.set(itemId, t);
    trimTranscript();
    li.scrollIntoView({block: "end"});
  }
  return t;
}

function trimTranscript() {
  // A long conversation keeps the page light: the oldest turns leave the DOM and the maps.
  const list = $("transcript");
  while (list.children.length > KEEP_TURNS) {
    const li = list.firstElementChild;
    if (li.dataset.item) duplex.turns.delete(li.dataset.item);
    if (li.dataset.response) duplex.replies.delete(li.dataset.response);
    li.remove();
  }
}

function renderUser(t, stable, unstable, final) {
  if (t.final && !final) return;  // a late partial never overwrites the final transcript
  t.final = final;
  const text = t.li.querySelector(".text");
  text.className = "text " + (final ? "final" : "partial");
  text.textContent = "";
  const s = document.createElement("span");
  s.className = "stable";
  s.textContent = stable || "";
  const u = document.createElement("span");
  u.className = "unstable";
  u.textContent = unstable ? (stable ? " " : "") + unstable : "";
  text.append(s, u);
  t.li.classList.toggle("tentative", !final);
}

function reply(id) {
  let r = duplex.replies.get(id);
  if (!r) {
    const li = document.createElement("li");
    li.className = "turn agent";
    li.dataset.response = id;
    li.innerHTML = '<span class="who">agent</span><span class="text"></span><span class="note"></span>';
    $("transcript").appendChild(li);
    r = {id, li, text: "", words: [], played: 0, rate: 24000, heard: null, interrupted: false, done: false};
    duplex.replies.set(id, r);
    trimTranscript();
    li.scrollIntoView({block: "end"});
  }
  return r;
}

function renderReply(r) {
  // Words of the generated text; the first `heard` of them were played (their middle reached the
  // speaker), the rest are pending, or struck out once the reply was interrupted.
  const tokens = r.text.split(/\s+/).filter(Boolean);
  let heard;
  if (r.heard !== null) heard = r.heard.split(/\s+/).filter(Boolean).length;
  else if (r.done) heard = tokens.length;
  else heard = r.words.filter((w) => (w.start + w.end) / 2 <= r.played).length;
  const text = r.li.querySelector(".text");
  text.textContent = "";
  tokens.forEach((tok, i) => {
    const span = document.createElement("span");
    span.className = "word " + (i < heard ? "heard" : (r.interrupted ? "unheard" : "pending"));
    span.textContent = tok;
    text.append(span, " ");
  });
  const note = r.li.querySelector(".note");
  if (r.interrupted) {
    note.textContent = !heard ? "dropped before you heard it"
      : heard >= tokens.length ? "interrupted as it ended: you heard all of it"
      : "interrupted: you heard " + heard + " of " + tokens.length + " words";
  }
  else note.textContent = "";
}

// -- latency ----------------------------------------------------------------------------------------

function latencyRow(id) {
  let row = duplex.latency.get(id);
  if (!row) {
    const tr = document.createElement("tr");
    tr.dataset.response = id;
    tr.innerHTML = "<td></td><td class='server'>-</td><td class='browser'>-</td><td class='barge'>-</td>";
    tr.cells[0].textContent = id.replace("resp_", "#");
    const body = document.querySelector("#latency tbody");
    body.appendChild(tr);
    row = {tr, server: {}, browser: null, barge: null};
    duplex.latency.set(id, row);
    while (body.children.length > KEEP_ROWS) {
      duplex.latency.delete(body.firstElementChild.dataset.response);
      body.firstElementChild.remove();
    }
  }
  return row;
}

const ms = (s) => Math.round(s * 1000) + " ms";

function onMetric(m) {
  if (!m.response_id) return;
  const row = latencyRow(m.response_id);
  if (m.name === "barge_in_s") {
    row.barge = m.value;
    renderBarge(row);
    return;
  }
  row.server[m.name] = m.value;
  if (row.server.voice_to_voice_s !== undefined) {
    const cell = row.tr.querySelector(".server");
    cell.textContent = ms(row.server.voice_to_voice_s);
    cell.title = Object.entries(row.server).filter(([k]) => k !== "voice_to_voice_s")
      .map(([k, v]) => k.replace(/_s$/, "") + ": " + ms(v)).join("\n");
  }
}

async function pollStats() {
  const pc = duplex.pc;
  if (!pc) return;
  let report;
  try { report = await pc.getStats(); } catch (err) { return; }
  const now = Date.now();
  const cur = {};
  report.forEach((s) => {
    if (s.type === "media-source" && s.kind === "audio") {
      cur.micEnergy = s.totalAudioEnergy; cur.micDuration = s.totalSamplesDuration; cur.micLevel = s.audioLevel;
    } else if (s.type === "inbound-rtp" && s.kind === "audio") {
      cur.energy = s.totalAudioEnergy; cur.duration = s.totalSamplesDuration; cur.audioLevel = s.audioLevel;
      cur.bytes = s.bytesReceived; cur.jbDelay = s.jitterBufferDelay; cur.jbCount = s.jitterBufferEmittedCount;
      cur.lost = s.packetsLost;
    }
  });
  const prev = lastStats;
  lastStats = cur;
  if (!prev) return;
  // Mean level over the last poll period, from the energy counters (audioLevel alone is too spiky).
  const level = (e1, e0, d1, d0, fallback) =>
    (d1 > d0 && e1 >= e0) ? Math.sqrt((e1 - e0) / (d1 - d0)) : (fallback || 0);
  const st = duplex.stats;
  st.micLevel = level(cur.micEnergy, prev.micEnergy, cur.micDuration, prev.micDuration, cur.micLevel);
  st.agentLevel = level(cur.energy, prev.energy, cur.duration, prev.duration, cur.audioLevel);
  st.bytesReceived = cur.bytes || 0; st.audioLevel = cur.audioLevel || 0;
  st.peakAudioLevel = Math.max(st.peakAudioLevel, st.audioLevel);
  st.totalAudioEnergy = cur.energy || 0; st.packetsLost = cur.lost || 0;
  if (cur.jbCount > (prev.jbCount || 0)) st.jitterBufferS = (cur.jbDelay - prev.jbDelay) / (cur.jbCount - prev.jbCount);
  if (now - lastReport > 1000 && duplex.dc && duplex.dc.readyState === "open") {
    lastReport = now;
    duplex.dc.send(JSON.stringify({type: "client.stats", jitter_buffer_s: st.jitterBufferS}));
    renderLinkStats();
  }
}

// -- audio taps: the latency figures, on the clock and the signal of the audio itself ----------------
// WebAudio analysers read the microphone and the agent's audio stream (what the <audio> element plays)
// every TAP_MS: the end of the user's speech is the last loud microphone reading, the agent is heard
// at its first loud reading. (WebRTC stats levels lag the audio by their polling and smoothing.)

function startTaps(agentStream) {
  if (duplex.taps || !duplex.stream || !window.AudioContext) return;
  const ctx = new AudioContext();
  const sink = ctx.createGain();
  sink.gain.value = 0;  // analysers must reach the destination to be processed; they play nothing
  sink.connect(ctx.destination);
  const tap = (stream) => {
    const a = ctx.createAnalyser();
    a.fftSize = 512;  // ~10 ms at 48 kHz
    ctx.createMediaStreamSource(stream).connect(a);
    a.connect(sink);
    return a;
  };
  duplex.taps = {ctx, mic: tap(duplex.stream), agent: tap(agentStream), buf: new Float32Array(512)};
  ctx.resume().catch(() => {});
  tapTimer = setInterval(readTaps, TAP_MS);
}

function rms(analyser, buf) {
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
  return Math.sqrt(sum / buf.length);
}

function readTaps() {
  const t = duplex.taps;
  if (!t) return;
  const now = Date.now();
  const mic = rms(t.mic, t.buf), agent = rms(t.agent, t.buf);
  $("mic-level").value = Math.min(1, mic * 4);
  $("agent-level").value = Math.min(1, agent * 4);
  const heardAt = duplex.micLoudAt;  // the last loud microphone reading before this one
  if (mic > MIC_LOUD) duplex.micLoudAt = now;
  localBargeIn(mic > MIC_LOUD, now);
  // Browser latency: from the user's last loud microphone reading to the agent's first audible one.
  const a = duplex.awaiting;
  if (a && agent > AGENT_LOUD && !duplex.localPause) {
    duplex.awaiting = null;
    if (heardAt) {
      const row = latencyRow(a.id);
      row.browser = (now - heardAt) / 1000;
      row.tr.querySelector(".browser").textContent = ms(row.browser);
    }
  }
}

// Barge-in on the page itself: the user's speech over the agent mutes the agent's audio here at
// once (the microphone loud for BARGE_MS), without waiting for the server's pause to cross the
// network and the jitter buffer. The server decides what happens next: it resumes (a backchannel,
// a cough: the page unmutes when the agent speaks again) or interrupts (the page unmutes for the
// next reply). The figure is from the microphone turning loud to the mute: the time the user heard
// the agent over their own speech.
function localBargeIn(loud, now) {
  const p = duplex.localPause;
  if (p && !p.confirmed && now - p.mutedAt > 1000) unmuteAgent();  // the server heard no speech: false alarm
  if (!loud) { duplex.loudSince = 0; return; }
  if (!duplex.loudSince) duplex.loudSince = now;
  if (duplex.localPause || duplex.agentState !== "speaking" || now - duplex.loudSince < BARGE_MS) return;
  muteHere(duplex.loudSince, false);
}

// Mute the agent here; a barge-in of the page's own (from `onsetAt`, the microphone turning loud)
// or, `serverFirst`, the server's pause arrived first (it pauses on its VAD's first voiced window,
// often before the page's rule fires): what it sent before the pause still plays here, so the page
// mutes too, and the figure is the server's (agent.metric barge_in_s), not the page's.
function muteHere(onsetAt, serverFirst) {
  const audio = $("agent-audio");
  audio.muted = true;
  const id = [...duplex.replies.keys()].pop() || null;
  duplex.localPause = {onsetAt, mutedAt: Date.now(), id, confirmed: serverFirst};
  const seconds = (duplex.localPause.mutedAt - onsetAt) / 1000;
  duplex.bargeIns.push({id, seconds, onsetAt, mutedAt: duplex.localPause.mutedAt, serverFirst});
  if (serverFirst) return;
  if (id) {
    const row = latencyRow(id);
    row.bargeBrowser = seconds;
    renderBarge(row);
  }
}

function unmuteAgent() {
  if (!duplex.localPause) return;
  duplex.localPause = null;
  $("agent-audio").muted = false;
}

function renderBarge(row) {
  const parts = [row.barge !== null ? "server " + ms(row.barge) : null,
                 row.bargeBrowser !== undefined ? "here " + ms(row.bargeBrowser) : null];
  row.tr.querySelector(".barge").textContent = parts.filter(Boolean).join(" / ") || "-";
}

function renderLinkStats() {
  const st = duplex.stats, dl = $("link-stats");
  const rows = [["received", (st.bytesReceived / 1024).toFixed(0) + " kB"],
                ["jitter buffer", ms(st.jitterBufferS)], ["packets lost", String(st.packetsLost)]];
  dl.textContent = "";
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    dl.append(dt, dd);
  }
}

// -- wiring -----------------------------------------------------------------------------------------

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", () => { duplex.wanted = false; keepResumeToken(null); disconnect(); });
$("mute").addEventListener("change", (e) => {
  if (duplex.stream) duplex.stream.getAudioTracks().forEach((t) => { t.enabled = !e.target.checked; });
});
window.addEventListener("beforeunload", () => { if (duplex.pc) duplex.pc.close(); });
if (!window.RTCPeerConnection || !navigator.mediaDevices) {
  showError("This browser cannot do WebRTC here. Use a current browser, on https:// or http://localhost.");
  $("connect").disabled = true;
}
