// chatraftd web page: live chat over Server-Sent Events and a picture of the cluster.
//
// It talks only to the node that served it. Every string from the network is put on the page
// with textContent, never parsed as HTML. Every request goes through request() or openStream().
//
// Client tokens: when the node answers 401, the page asks for a token and keeps it in
// sessionStorage (this tab, until it closes). fetch() sends it as `Authorization: Bearer`.
// EventSource cannot set headers, so the token also goes into a session cookie scoped to the
// stream's path; it is never put into a URL, where it would end up in logs and history.
'use strict';

(() => {
  const POLL_MS = 2000;
  const CHART_SPAN_MS = 5 * 60 * 1000;
  const SEND_GIVE_UP_MS = 2 * 60 * 1000;
  const STORE_SENDER = 'chatraftd.sender';
  const STORE_TOKEN = 'chatraftd.token';
  const TOKEN_COOKIE = 'chatraftd_token';
  // Printable ASCII without the characters a cookie value cannot hold.
  const tokenFits = (t) => /^[\x21-\x7e]{1,512}$/.test(t) && !/[",;\\]/.test(t);

  const $ = (id) => document.getElementById(id);

  // Makes an element with a class and text; text is always text.
  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // ---- Talking to the node -------------------------------------------------------------

  class RequestError extends Error {
    constructor(status, body, retryAfter) {
      const msg = body && body.error ? body.error.message : status ? `HTTP ${status}` : 'no answer';
      super(msg);
      this.status = status;
      this.code = body && body.error ? body.error.code : null;
      this.retryAfter = retryAfter;
    }
    // No answer, a 5xx, a timeout or a throttle: the same request may succeed later.
    get retryable() {
      return !this.status || this.status >= 500 || this.status === 408 || this.status === 429;
    }
  }

  const token = () => sessionStorage.getItem(STORE_TOKEN);

  // The cookie carries the token to the stream only: scoped to its path, gone with the session.
  function setTokenCookie(t) {
    const secure = location.protocol === 'https:' ? '; Secure' : '';
    document.cookie = `${TOKEN_COOKIE}=${t}; Path=/api/v1/stream; SameSite=Strict${secure}`;
  }

  // Shows the token form; `why` says what happened.
  function askForToken(why) {
    const form = $('token-form');
    if (!form.hidden) return;
    $('token-why').textContent = why;
    form.hidden = false;
    $('token-input').focus();
  }

  async function request(method, path, body) {
    const init = { method, headers: { Accept: 'application/json' }, cache: 'no-store' };
    if (token()) init.headers.Authorization = `Bearer ${token()}`;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new RequestError(0, null, null);
    }
    const data = await resp.json().catch(() => null);
    if (resp.status === 401) {
      askForToken(token() ? 'This node refused the token. Enter another one.' : 'This node needs a client token.');
    }
    if (!resp.ok) throw new RequestError(resp.status, data, resp.headers.get('Retry-After'));
    return data;
  }

  function openStream(conv, from) {
    const q = new URLSearchParams({ conv_id: conv, from: String(from) });
    return new EventSource(`/api/v1/stream?${q}`);
  }

  // A v4 UUID. crypto.randomUUID exists only in secure contexts (https or localhost); a page
  // served over plain http from another host falls back to getRandomValues.
  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---- Chat ----------------------------------------------------------------------------

  const CONV_RE = /^[A-Za-z0-9._-]{1,64}$/;
  const chat = {
    conv: null,
    stream: null,
    // Seqs on screen: a record is shown once, however often a stream delivers it.
    seen: new Set(),
    lastSeq: 0,
    // msg_id -> element of a message sent from this page and not yet seen on the stream.
    pending: new Map(),
  };

  const timeFormat = new Intl.DateTimeFormat(undefined, {
    hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

  function setStreamState(state, text) {
    const p = $('stream-state');
    p.dataset.state = state;
    p.textContent = text;
  }

  function openConversation(conv) {
    if (chat.stream) chat.stream.close();
    chat.conv = conv;
    chat.seen.clear();
    chat.lastSeq = 0;
    chat.pending.clear();
    $('messages').replaceChildren();
    $('empty').hidden = false;
    $('conv-input').value = conv;
    document.title = `${conv} · chatraftd`;
    markChips();
    connect(1);
  }

  // The browser's EventSource reconnects by itself after a dropped connection and sends
  // Last-Event-ID, so the node resumes after the last seq shown. If it gives up (an error
  // answer), a new stream starts after the last seq on screen.
  function connect(from) {
    const conv = chat.conv;
    const es = openStream(conv, from);
    chat.stream = es;
    setStreamState('connecting', `connecting to ${conv}…`);
    es.addEventListener('open', () => {
      if (chat.stream === es) setStreamState('live', `live · ${conv}`);
    });
    es.addEventListener('message', (ev) => {
      if (chat.stream !== es) return;
      let record;
      try {
        record = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (record.conv_id === conv) showRecord(record);
    });
    es.addEventListener('error', () => {
      if (chat.stream !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        setStreamState('reconnecting', 'connection lost · starting again…');
        setTimeout(() => {
          if (chat.stream === es) connect(chat.lastSeq + 1);
        }, POLL_MS);
      } else {
        setStreamState('reconnecting', 'connection lost · reconnecting…');
      }
    });
  }

  function showRecord(r) {
    if (!Number.isSafeInteger(r.seq) || chat.seen.has(r.seq)) return;
    chat.seen.add(r.seq);
    const list = $('messages');
    const stick = nearBottom();
    const li = el('li', 'msg');
    li.dataset.seq = r.seq;
    li.dataset.index = r.index;
    li.dataset.msgId = r.msg_id;
    if (r.sender === $('sender-input').value) li.classList.add('mine');
    const meta = el('div', 'meta');
    meta.append(el('span', 'sender', r.sender));
    const when = new Date(r.committed_at);
    const time = el('time', 'time', Number.isNaN(when.getTime()) ? r.committed_at : timeFormat.format(when));
    time.dateTime = r.committed_at;
    if (!Number.isNaN(when.getTime())) time.title = `committed ${dateFormat.format(when)} (term ${r.term})`;
    meta.append(time);
    const pos = el('span', 'pos', `#${r.seq} · index ${r.index}`);
    pos.title = 'seq in this conversation · Raft log index';
    meta.append(pos);
    li.append(meta, el('div', 'payload', r.payload));

    // Keep seq order: a record goes before the first shown record with a higher seq, and
    // before messages still being sent.
    let before = null;
    if (r.seq < chat.lastSeq) {
      before = Array.from(list.children).find((c) => c.dataset.seq && Number(c.dataset.seq) > r.seq) || null;
    } else {
      before = list.querySelector('.msg.pending');
    }
    list.insertBefore(li, before);
    chat.lastSeq = Math.max(chat.lastSeq, r.seq);
    const pending = chat.pending.get(r.msg_id);
    if (pending) {
      pending.remove();
      chat.pending.delete(r.msg_id);
    }
    $('empty').hidden = true;
    if (stick) window.scrollTo(0, document.body.scrollHeight);
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  // A message is shown as pending until the stream delivers it; it carries its msg_id from
  // the first attempt on, so a retry after a lost answer is stored once and shown once.
  function send(payload) {
    const sender = $('sender-input').value.trim();
    const msg = { conv_id: chat.conv, sender, payload, msg_id: uuid() };
    const li = el('li', 'msg mine pending');
    li.dataset.msgId = msg.msg_id;
    const meta = el('div', 'meta');
    meta.append(el('span', 'sender', sender), el('span', 'pos note', 'sending…'));
    li.append(meta, el('div', 'payload', payload));
    chat.pending.set(msg.msg_id, li);
    $('messages').append(li);
    $('empty').hidden = true;
    window.scrollTo(0, document.body.scrollHeight);
    deliver(msg, li);
  }

  async function deliver(msg, li) {
    const note = li.querySelector('.note');
    li.classList.remove('failed');
    const oldRetry = li.querySelector('.retry');
    if (oldRetry) oldRetry.remove();
    const giveUp = Date.now() + SEND_GIVE_UP_MS;
    let wait = 500;
    for (let attempt = 1; ; attempt++) {
      try {
        const rec = await request('POST', '/api/v1/message', msg);
        if (chat.pending.has(msg.msg_id)) note.textContent = `committed as #${rec.seq}`;
        return;
      } catch (e) {
        if (!(e instanceof RequestError) || !e.retryable || Date.now() > giveUp) {
          note.textContent = `not sent: ${e.message}`;
          li.classList.add('failed');
          const retry = el('button', 'retry', 'Try again');
          retry.type = 'button';
          retry.addEventListener('click', () => deliver(msg, li));
          li.append(retry);
          return;
        }
        note.textContent = `retrying (${e.message})…`;
        const hinted = Number(e.retryAfter) * 1000;
        await sleep(Number.isFinite(hinted) && hinted > 0 ? Math.min(hinted, 5000) : wait);
        wait = Math.min(wait * 2, 5000);
      }
    }
  }

  async function loadConversations() {
    let data;
    try {
      data = await request('GET', '/api/v1/conversations');
    } catch (e) {
      return;
    }
    const convs = (data.conversations || [])
      .slice()
      .sort((a, b) => b.last_index - a.last_index);
    const list = $('conv-list');
    list.replaceChildren(...convs.map((c) => {
      const o = document.createElement('option');
      o.value = c.conv_id;
      return o;
    }));
    const chips = $('conv-chips');
    chips.replaceChildren(...convs.slice(0, 8).map((c) => {
      const b = el('button', null, c.conv_id);
      b.type = 'button';
      b.dataset.conv = c.conv_id;
      b.append(el('span', 'count', c.count));
      b.addEventListener('click', () => { location.hash = `#/chat/${c.conv_id}`; });
      return b;
    }));
    markChips();
  }

  function markChips() {
    for (const b of $('conv-chips').children) {
      b.setAttribute('aria-pressed', String(b.dataset.conv === chat.conv));
    }
  }

  // ---- Cluster -------------------------------------------------------------------------

  // Samples for the chart: time, this node's commit index, the worst commit-to-apply lag.
  const samples = [];

  function setBadge(role, text) {
    const b = $('node-badge');
    b.dataset.role = role;
    b.textContent = text;
  }

  async function pollCluster() {
    let view;
    try {
      view = await request('GET', '/api/v1/cluster');
    } catch (e) {
      setBadge('down', 'node unreachable');
      $('cluster-summary').textContent = `This node does not answer (${e.message}).`;
      return;
    }
    setBadge(view.role || 'unknown', `node ${view.node_id} · ${view.role} · term ${view.term}`);
    renderMembers(view);
    const me = view.members.find((m) => m.node_id === view.node_id);
    let worstLag = 0;
    for (const m of view.members) {
      if (m.up) worstLag = Math.max(worstLag, Math.max(0, m.commit_index - m.last_applied));
    }
    if (me && me.up) {
      samples.push({ t: Date.now(), commit: me.commit_index, lag: worstLag });
      while (samples.length && samples[0].t < Date.now() - CHART_SPAN_MS) samples.shift();
    }
    drawChart();
  }

  function renderMembers(view) {
    const up = view.members.filter((m) => m.up).length;
    const leader = view.leader ? `node ${view.leader.node_id} leads` : 'no leader known';
    $('cluster-summary').textContent =
      `${view.members.length} members, ${up} up · ${leader} · term ${view.term} (as node ${view.node_id} sees it)`;
    $('members').replaceChildren(...view.members.map((m) => {
      const li = el('li', 'member');
      li.dataset.nodeId = m.node_id;
      li.dataset.up = String(m.up);
      const role = m.up ? m.role : 'down';
      li.dataset.role = role;
      if (m.up && m.role === 'leader') li.classList.add('leader');
      const h = el('h3', null, `node ${m.node_id}`);
      const pill = el('span', 'role', role);
      pill.dataset.role = role;
      h.append(pill);
      if (!m.voter) h.append(el('span', 'role', 'learner'));
      if (m.node_id === view.node_id) h.append(el('span', 'here', 'this page'));
      li.append(h, el('p', 'addr', m.api_addr));
      if (m.up) {
        const dl = el('dl', 'stats');
        const row = (k, v) => dl.append(el('dt', null, k), el('dd', null, v));
        row('term', m.term);
        row('last log', m.last_log_index);
        row('commit', m.commit_index);
        row('applied', m.last_applied);
        row('replication lag', m.lag === null || m.lag === undefined ? '—' : `${m.lag} entries`);
        li.append(dl);
      } else {
        li.append(el('p', 'error', m.error || 'does not answer'));
      }
      return li;
    }));
  }

  function drawChart() {
    const canvas = $('chart');
    if (canvas.offsetParent === null) return; // not visible
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(canvas);
    const color = (name) => css.getPropertyValue(name).trim();
    const pad = { l: 36, r: 36, t: 8, b: 18 };
    const now = Date.now();
    const x = (t) => pad.l + ((t - (now - CHART_SPAN_MS)) / CHART_SPAN_MS) * (w - pad.l - pad.r);

    const rates = [];
    for (let i = 1; i < samples.length; i++) {
      const dt = (samples[i].t - samples[i - 1].t) / 1000;
      if (dt > 0) rates.push({ t: samples[i].t, v: Math.max(0, samples[i].commit - samples[i - 1].commit) / dt });
    }
    const lags = samples.map((s) => ({ t: s.t, v: s.lag }));
    const top = (pts) => niceMax(Math.max(1, ...pts.map((p) => p.v)));
    // Lag counts whole entries: at least one entry per gridline.
    const lagTop = (pts) => Math.max(4, top(pts));
    const rateMax = top(rates);
    const lagMax = lagTop(lags);

    ctx.font = '11px system-ui, sans-serif';
    ctx.lineWidth = 1;
    ctx.strokeStyle = color('--line');
    ctx.fillStyle = color('--muted');
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + (i / 4) * (h - pad.t - pad.b);
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(w - pad.r, y);
      ctx.stroke();
      const frac = 1 - i / 4;
      ctx.textAlign = 'right';
      ctx.fillText(fmt(rateMax * frac), pad.l - 4, y + 4);
      ctx.textAlign = 'left';
      ctx.fillText(fmt(lagMax * frac), w - pad.r + 4, y + 4);
    }
    ctx.textAlign = 'left';
    ctx.fillText('−5 min', pad.l, h - 4);
    ctx.textAlign = 'right';
    ctx.fillText('now', w - pad.r, h - 4);

    const line = (pts, max, stroke) => {
      if (pts.length === 0) return;
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach((p, i) => {
        const y = pad.t + (1 - p.v / max) * (h - pad.t - pad.b);
        if (i === 0) ctx.moveTo(x(p.t), y);
        else ctx.lineTo(x(p.t), y);
      });
      ctx.stroke();
    };
    line(lags, lagMax, color('--lag'));
    line(rates, rateMax, color('--rate'));
  }

  // The top of an axis with four gridline steps of a round size (1, 2, 2.5 or 5 times a
  // power of ten), so every label is a round number.
  function niceMax(v) {
    const raw = v / 4;
    const p = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw);
    return step * 4;
  }

  function fmt(v) {
    return Number.isInteger(v) ? String(v) : String(Number(v.toFixed(2)));
  }

  // ---- Views and start-up --------------------------------------------------------------

  // #/chat/<conversation> or #/cluster.
  function route() {
    const parts = location.hash.replace(/^#\/?/, '').split('/');
    const view = parts[0] === 'cluster' ? 'cluster' : 'chat';
    $('chat-view').hidden = view !== 'chat';
    $('cluster-view').hidden = view !== 'cluster';
    for (const [tab, name] of [['tab-chat', 'chat'], ['tab-cluster', 'cluster']]) {
      if (name === view) $(tab).setAttribute('aria-current', 'page');
      else $(tab).removeAttribute('aria-current');
    }
    let conv = parts[0] === 'chat' && parts[1] ? decodeURIComponent(parts[1]) : chat.conv || 'general';
    if (!CONV_RE.test(conv)) conv = 'general';
    if (conv !== chat.conv) openConversation(conv);
    $('tab-chat').href = `#/chat/${chat.conv}`;
    if (view === 'cluster') drawChart();
  }

  function start() {
    if (token()) setTokenCookie(token());
    $('token-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('token-input').value.trim();
      if (!tokenFits(t)) {
        $('token-why').textContent = 'A token is printable text without spaces, quotes, commas or semicolons.';
        return;
      }
      sessionStorage.setItem(STORE_TOKEN, t);
      setTokenCookie(t);
      // Start over with the token: every view and the stream pick it up.
      location.reload();
    });

    const senderInput = $('sender-input');
    senderInput.value = localStorage.getItem(STORE_SENDER) || `guest-${uuid().slice(0, 4)}`;
    senderInput.addEventListener('change', () => {
      if (senderInput.value.trim()) localStorage.setItem(STORE_SENDER, senderInput.value.trim());
    });
    localStorage.setItem(STORE_SENDER, senderInput.value);

    $('conv-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const conv = $('conv-input').value.trim();
      if (CONV_RE.test(conv)) location.hash = `#/chat/${conv}`;
    });

    const payload = $('payload-input');
    $('send-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!senderInput.value.trim()) {
        senderInput.focus();
        return;
      }
      if (payload.value === '') return;
      send(payload.value);
      payload.value = '';
      payload.rows = 1;
      payload.focus();
    });
    // Enter sends, Shift+Enter adds a line.
    payload.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $('send-form').requestSubmit();
      }
    });
    payload.addEventListener('input', () => {
      payload.rows = Math.min(5, payload.value.split('\n').length);
    });

    window.addEventListener('hashchange', route);
    window.addEventListener('resize', drawChart);
    route();
    loadConversations();
    setInterval(loadConversations, 5 * POLL_MS);
    // One poll at a time: a slow answer delays the next poll instead of piling up requests.
    (async () => {
      for (;;) {
        await pollCluster();
        await sleep(POLL_MS);
      }
    })();
  }

  start();
})();
