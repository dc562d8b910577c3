'use strict';
// The routemesh status page: renders the state document that GET /events pushes (see
// README, "Status page"), in place, and reconnects by itself. No dependencies; every text
// from the server goes through textContent, never innerHTML.
(() => {
  const $ = (id) => document.getElementById(id);
  let doc = null;        // the last state document
  let skew = 0;          // server clock minus ours, ms
  let source = null;     // the EventSource
  let retry = null;      // reconnect timer
  let lostAt = 0;        // when the stream broke (0: live)
  let eventsKey = '';    // what the events list shows

  const serverNow = () => Date.now() + skew;

  // ---- formatting ---------------------------------------------------------------------
  function age(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return '–';
    let s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + 's';
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    return m + 'm ' + s + 's';
  }
  function since(unixMs) {
    return unixMs ? age(serverNow() - unixMs) : '–';
  }
  function num(x) {
    if (x === null || x === undefined) return '–';
    if (x === 0) return '0';
    if (x < 10) return x.toFixed(1);
    return Math.round(x).toLocaleString('en');
  }
  function bytes(x) {
    if (x === null || x === undefined) return '–';
    const units = ['B/s', 'kB/s', 'MB/s', 'GB/s'];
    let i = 0;
    while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    return (x < 10 && i > 0 ? x.toFixed(1) : Math.round(x)) + ' ' + units[i];
  }
  function pct(x) {
    if (x === null || x === undefined) return '–';
    return (x * 100).toFixed(x < 0.1 ? 1 : 0) + '%';
  }
  function clock(unixMs) {
    const t = new Date(unixMs - skew);
    const today = new Date().toDateString() === t.toDateString();
    const hms = t.toLocaleTimeString('en-GB', { hour12: false });
    return today ? hms : t.toLocaleDateString('en-CA') + ' ' + hms;
  }
  const stateClass = (s) => 's-' + String(s || 'other').toLowerCase().replace(/[^a-z]+/g, '-').replace(/-$/, '');

  // ---- DOM helpers --------------------------------------------------------------------
  function setText(node, text) {
    text = String(text);
    if (node.textContent !== text) node.textContent = text;
  }
  function setAttr(node, name, value) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  // Fills cell i of row tr: text, and an optional class (a badge when `badge`).
  function cell(tr, i, text, opts) {
    while (tr.cells.length <= i) tr.insertCell();
    const td = tr.cells[i];
    opts = opts || {};
    setAttr(td, 'class', opts.cls || '');
    if (opts.title !== undefined) setAttr(td, 'title', opts.title || '');
    if (opts.badge) {
      let b = td.firstElementChild;
      if (!b || b.tagName !== 'SPAN') { td.textContent = ''; b = td.appendChild(document.createElement('span')); }
      setAttr(b, 'class', 'badge ' + stateClass(opts.badge));
      setText(b, text);
    } else if (td.firstElementChild) {
      td.textContent = text;
    } else {
      setText(td, text);
    }
    return td;
  }
  // Makes tbody's rows match items (keyed by key(item)), reusing rows, so nothing flickers.
  function syncRows(tbody, items, key, fill) {
    const old = new Map();
    for (const tr of Array.from(tbody.rows)) old.set(tr.dataset.key, tr);
    items.forEach((item, i) => {
      const k = key(item);
      let tr = old.get(k);
      if (tr) old.delete(k); else { tr = document.createElement('tr'); tr.dataset.key = k; }
      fill(tr, item);
      if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
    });
    for (const tr of old.values()) tr.remove();
  }
  // A button in cell i of tr (kept across renders), labelled `label`, calling onClick.
  function button(tr, i, label, onClick) {
    while (tr.cells.length <= i) tr.insertCell();
    const td = tr.cells[i];
    setAttr(td, 'class', 'act');
    let b = td.firstElementChild;
    if (!b) { b = td.appendChild(document.createElement('button')); b.type = 'button'; }
    setText(b, label);
    b.onclick = onClick;
    return b;
  }
  function clearCell(tr, i) {
    while (tr.cells.length <= i) tr.insertCell();
    if (tr.cells[i].textContent !== '' || tr.cells[i].firstChild) tr.cells[i].textContent = '';
  }
  function show(id, visible) {
    const e = $(id);
    if (e.hidden === visible) e.hidden = !visible;
  }

  // ---- write actions ------------------------------------------------------------------
  function result(kind, text) {
    const r = $('action-result');
    r.dataset.kind = kind;
    setText(r, text);
  }
  async function act(path, body, what) {
    const token = $('token').value.trim();
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    result('pending', what + '…');
    let resp, data = {};
    try {
      resp = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body), credentials: 'omit', cache: 'no-store' });
      data = await resp.json().catch(() => ({}));
    } catch (e) {
      result('error', what + ' failed: ' + e.message);
      return;
    }
    if (resp.ok) result('ok', what + ': done');
    else result('error', what + ' refused (' + resp.status + '): ' + (data.error || resp.statusText));
  }
  // The confirmation dialog; `weight` set: ask for a number first.
  function confirmAction(text, okLabel, weight, run) {
    const dlg = $('dlg');
    setText($('dlg-text'), text);
    setText($('dlg-ok'), okLabel);
    show('dlg-weight-row', weight !== undefined);
    if (weight !== undefined) $('dlg-weight').value = String(weight);
    $('dlg-ok').onclick = () => {
      let w;
      if (weight !== undefined) {
        w = Number($('dlg-weight').value);
        if (!Number.isInteger(w) || w < 0 || w > 1000) { setText($('dlg-text'), 'Weight must be a whole number from 0 to 1000.'); return; }
      }
      dlg.close();
      run(w);
    };
    $('dlg-cancel').onclick = () => dlg.close();
    dlg.showModal();
  }
  const enc = encodeURIComponent;
  function drainButton(tr, i, n) {
    const drain = n.availability !== 'drain';
    const b = button(tr, i, drain ? 'Drain' : 'Activate', () => {
      if (drain) {
        confirmAction('Drain node ' + n.name + '? Its tasks get no new connections from any node; open ones run on.', 'Drain', undefined,
          () => act('/actions/nodes/' + enc(n.name) + '/availability', { availability: 'drain' }, 'drain ' + n.name));
      } else {
        confirmAction('Activate node ' + n.name + '? Its tasks take new connections again.', 'Activate', undefined,
          () => act('/actions/nodes/' + enc(n.name) + '/availability', { availability: 'active' }, 'activate ' + n.name));
      }
    });
    b.dataset.action = drain ? 'drain' : 'activate';
  }
  function weightButton(tr, i, svc, t) {
    const b = button(tr, i, 'Weight…', () => confirmAction('Set the weight of task ' + svc + '/' + t.id + ' (0 takes it out of rotation).', 'Set weight', t.weight,
      (w) => act('/actions/tasks/' + enc(svc) + '/' + enc(t.id) + '/weight', { weight: w }, 'weight ' + svc + '/' + t.id + ' = ' + w)));
    b.dataset.action = 'weight';
  }

  // ---- sections -----------------------------------------------------------------------
  function renderHeader(d) {
    setText($('node-title'), 'node ' + d.node);
    document.title = (bannerText(d) ? '⚠ ' : '') + d.node + ' · routemesh';
    const disc = d.discovery;
    let s = disc.backend === 'static'
      ? 'discovery: static (config file)'
      : 'discovery: etcd ' + (disc.up ? 'up' : 'DOWN') + ' · revision ' + disc.revision + ' · last sync ' + (disc.last_sync_ms ? since(disc.last_sync_ms) + ' ago' : 'never');
    s += ' · v' + d.version + ' · up ' + age(serverNow() - d.started * 1000);
    setText($('summary'), s);
    setText($('footer-version'), 'routemesh ' + d.version + ' on ' + d.node);
  }
  function bannerText(d) {
    const disc = d.discovery;
    if (disc.backend !== 'etcd') return null;
    const last = disc.last_sync_ms ? since(disc.last_sync_ms) + ' ago' : 'never';
    if (!disc.synced) return ['unsynced', 'Discovery has not synced with etcd yet: this node has no routing state from the cluster.'];
    if (!disc.up) return ['down', 'Discovery is DOWN: etcd is unreachable. This node keeps routing on its last snapshot (revision ' + disc.revision + ', last sync ' + last + '); changes in the cluster are not seen until etcd answers again.'];
    if (disc.stale) return ['stale', 'The routing snapshot is STALE: no sync with etcd for ' + since(disc.last_sync_ms) + ' (more than ' + disc.stale_after_seconds + 's).'];
    return null;
  }
  function renderBanner(d) {
    const b = $('banner');
    const t = bannerText(d);
    show('banner', !!t);
    if (t) { b.dataset.kind = t[0]; setText(b, t[1]); } else delete b.dataset.kind;
  }
  function renderNodes(d) {
    const nodes = d.nodes;
    setText($('nodes-count'), nodes.length ? nodes.filter((n) => n.status === 'Ready').length + '/' + nodes.length + ' Ready' : '');
    show('nodes-empty', nodes.length === 0);
    setText($('nodes-empty'), d.discovery.backend === 'static' ? 'Static discovery: no nodes are registered (this node only).' : 'No node is registered in etcd yet.');
    syncRows($('nodes').tBodies[0], nodes, (n) => n.name, (tr, n) => {
      tr.dataset.status = n.status;
      tr.dataset.availability = n.availability;
      cell(tr, 0, n.name + (n.self ? ' (this node)' : ''), { cls: n.self ? 'mono self' : 'mono' });
      cell(tr, 1, n.advertise || '–', { cls: 'mono' });
      cell(tr, 2, n.status, { badge: n.status });
      cell(tr, 3, n.availability, { badge: n.availability });
      cell(tr, 4, n.version || '–');
      cell(tr, 5, n.status === 'Ready' && n.started ? age(serverNow() - n.started * 1000) : '–');
      const reach = n.tasks === 0 ? ['no tasks', 'other']
        : [n.tasks_healthy + '/' + n.tasks + ' healthy', n.tasks_healthy === n.tasks ? 'ok' : (n.tasks_healthy === 0 ? 'error' : 'stale')];
      cell(tr, 6, reach[0], { badge: reach[1] });
      if (d.actions) drainButton(tr, 7, n); else clearCell(tr, 7);
    });
  }
  function renderListeners(d) {
    show('listeners-empty', d.listeners.length === 0);
    syncRows($('listeners').tBodies[0], d.listeners, (l) => l.name, (tr, l) => {
      const state = l.state || 'bound';
      tr.dataset.state = state;
      cell(tr, 0, l.name, { cls: 'mono' });
      cell(tr, 1, l.port, { cls: 'num' });
      cell(tr, 2, l.protocol);
      cell(tr, 3, l.service || '(routes)');
      cell(tr, 4, l.source || 'config');
      cell(tr, 5, state, { badge: state.split(':')[0] });
      cell(tr, 6, l.active_connections === null ? '–' : l.active_connections, { cls: 'num' });
      cell(tr, 7, num(l.connections_per_s), { cls: 'num' });
      cell(tr, 8, bytes(l.bytes_in_per_s), { cls: 'num' });
      cell(tr, 9, bytes(l.bytes_out_per_s), { cls: 'num' });
    });
    show('published-empty', d.published.length === 0);
    syncRows($('published').tBodies[0], d.published, (p) => p.name, (tr, p) => {
      cell(tr, 0, p.name, { cls: 'mono' });
      cell(tr, 1, p.listen, { cls: 'mono' });
      cell(tr, 2, p.protocol);
      cell(tr, 3, p.service || '(routes)');
      cell(tr, 4, p.source);
      cell(tr, 5, p.decision + (p.held_by ? ' (' + p.held_by + ')' : ''), { badge: p.decision });
      cell(tr, 6, p.bound_nodes + '/' + p.ready_nodes, { badge: p.bound_nodes === p.ready_nodes ? 'ok' : 'stale' });
    });
  }
  const TASK_HEAD = ['Task', 'Address', 'Node', 'State', 'Reason', 'Since', 'Weight', 'In flight', 'Req/s', 'Errors', 'Last error', ''];
  function serviceBlock(container, svc, i) {
    let block = null;
    for (const b of container.children) if (b.dataset.service === svc.name) { block = b; break; }
    if (!block) {
      block = document.createElement('div');
      block.className = 'svc';
      block.dataset.service = svc.name;
      const head = block.appendChild(document.createElement('div'));
      head.className = 'svc-head';
      head.appendChild(document.createElement('span')).className = 'svc-name';
      head.appendChild(document.createElement('span')).className = 'svc-meta';
      const table = block.appendChild(document.createElement('table'));
      const hr = table.createTHead().insertRow();
      TASK_HEAD.forEach((h, j) => {
        const th = document.createElement('th');
        th.textContent = h;
        if (j >= 7 && j <= 9) th.className = 'num';
        hr.appendChild(th);
      });
      table.createTBody();
    }
    if (container.children[i] !== block) container.insertBefore(block, container.children[i] || null);
    return block;
  }
  function renderServices(d) {
    const container = $('services');
    const names = new Set(d.services.map((s) => s.name));
    for (const b of Array.from(container.children)) if (!names.has(b.dataset.service)) b.remove();
    show('services-empty', d.services.length === 0);
    setText($('services-count'), d.services.length ? d.services.length + ' service(s)' : '');
    d.services.forEach((svc, i) => {
      const block = serviceBlock(container, svc, i);
      setText(block.querySelector('.svc-name'), svc.name);
      setText(block.querySelector('.svc-meta'), svc.live + '/' + svc.tasks.length + ' live · ' + svc.balance);
      syncRows(block.querySelector('tbody'), svc.tasks, (t) => svc.name + '/' + t.id, (tr, t) => {
        tr.dataset.state = t.state;
        cell(tr, 0, t.id, { cls: 'mono' });
        cell(tr, 1, t.addr, { cls: 'mono' });
        cell(tr, 2, t.node || '–', { cls: 'mono' });
        cell(tr, 3, t.state, { badge: t.state });
        cell(tr, 4, t.reason || '', { cls: 'err' });
        cell(tr, 5, since(t.since_ms), { cls: 'nowrap', title: t.since_ms ? 'since ' + clock(t.since_ms) : '' });
        cell(tr, 6, t.weight, { cls: 'num' });
        cell(tr, 7, t.in_flight, { cls: 'num' });
        cell(tr, 8, num(t.attempts_per_s), { cls: 'num' });
        cell(tr, 9, t.failures_per_s ? num(t.failures_per_s) + '/s (' + pct(t.error_ratio) + ')' : (t.failures_per_s === null ? '–' : '0'), { cls: 'num' });
        // The last error is shown apart only when it is not already the reason.
        cell(tr, 10, t.last_error && t.last_error !== t.reason ? t.last_error : '', { cls: 'err' });
        if (d.actions) weightButton(tr, 11, svc.name, t); else clearCell(tr, 11);
      });
    });
  }
  function renderEvents(d) {
    const list = $('events');
    const evs = d.events;
    show('events-empty', evs.length === 0);
    const key = evs.length + '|' + (evs.length ? evs[0].at_ms + evs[0].message : '');
    if (key !== eventsKey) {
      eventsKey = key;
      const frag = document.createDocumentFragment();
      for (const e of evs) {
        const li = document.createElement('li');
        li.dataset.kind = e.kind;
        li.dataset.subject = e.subject;
        li.dataset.state = e.state;
        li.dataset.at = String(e.at_ms);
        const when = li.appendChild(document.createElement('span'));
        when.className = 'when';
        const kind = li.appendChild(document.createElement('span'));
        kind.className = 'kind';
        kind.textContent = e.kind;
        const st = li.appendChild(document.createElement('span'));
        st.className = 'badge ' + stateClass(e.state);
        st.textContent = e.state;
        const msg = li.appendChild(document.createElement('span'));
        msg.className = 'msg';
        msg.textContent = e.message;
        frag.appendChild(li);
      }
      list.replaceChildren(frag);
    }
    for (const li of list.children) {
      const at = Number(li.dataset.at);
      const w = li.firstElementChild;
      setText(w, clock(at) + ' · ' + age(serverNow() - at));
      setAttr(w, 'title', new Date(at - skew).toString());
    }
  }
  function renderInvalid(d) {
    const entries = Object.entries(d.invalid || {});
    show('invalid-section', entries.length > 0);
    syncRows($('invalid').tBodies[0], entries, (e) => e[0], (tr, e) => {
      cell(tr, 0, e[0], { cls: 'mono' });
      cell(tr, 1, e[1], { cls: 'err' });
    });
  }
  function renderCertificates(d) {
    const certs = d.certificates || [];
    show('certificates-section', certs.length > 0);
    const badge = { valid: 'ok', failed: 'error', expired: 'error' };
    syncRows($('certificates').tBodies[0], certs, (c) => c.name, (tr, c) => {
      cell(tr, 0, c.name, { cls: 'mono' });
      cell(tr, 1, (c.domains || []).join(', ') || '–', { cls: 'mono' });
      cell(tr, 2, c.not_after ? new Date(c.not_after * 1000).toISOString().replace('.000', '') : '–');
      cell(tr, 3, c.issuer || '–');
      cell(tr, 4, c.state + (c.locked_by ? ' (' + c.locked_by + ')' : ''), { badge: badge[c.state] || 'stale' });
      cell(tr, 5, c.serving ? 'serving' : 'not serving', { badge: c.serving ? 'ok' : 'error' });
      cell(tr, 6, c.last_error || '', { cls: 'err' });
    });
  }
  function renderConnection() {
    const c = $('conn');
    const lost = lostAt && Date.now() - lostAt > 1500;
    const st = lostAt ? 'reconnecting' : (doc ? 'live' : 'connecting');
    setAttr(c, 'data-state', st);
    setText(c, st);
    show('conn-banner', !!lost);
    if (lost) setText($('conn-banner'), 'Connection to this node lost ' + age(Date.now() - lostAt) + ' ago; reconnecting…' + (doc ? ' The figures below are from ' + clock(doc.generated_ms) + '.' : ''));
  }
  function render() {
    renderConnection();
    if (!doc) return;
    renderHeader(doc);
    renderBanner(doc);
    show('actions-bar', !!doc.actions);
    renderNodes(doc);
    renderListeners(doc);
    renderServices(doc);
    renderEvents(doc);
    renderCertificates(doc);
    renderInvalid(doc);
  }

  // ---- the stream ---------------------------------------------------------------------
  function connect() {
    clearTimeout(retry);
    if (source) source.close();
    source = new EventSource('/events');
    source.onopen = () => { lostAt = 0; renderConnection(); };
    source.onmessage = (m) => {
      let d;
      try { d = JSON.parse(m.data); } catch (e) { return; }
      doc = d;
      skew = d.generated_ms - Date.now();
      lostAt = 0;
      render();
    };
    source.onerror = () => {
      if (!lostAt) lostAt = Date.now();
      renderConnection();
      // The browser retries by itself unless it gave up (e.g. a refused first connection).
      if (source.readyState === EventSource.CLOSED) retry = setTimeout(connect, 2000);
    };
  }
  connect();
  setInterval(render, 1000);
})();
