// medlinkd's status page: reads the broker's JSON API every 5 s and draws
// it. Plain JavaScript, no libraries, nothing fetched from elsewhere. Every
// label comes from the dictionary below; the language is the one the server
// wrote into <html lang> (?lang=, else Accept-Language). Data is put into
// the page as text (textContent), never as markup.
'use strict';

(function () {
  const REFRESH_MS = 5000;
  const MAX_ROWS = 200;

  const I18N = {
    en: {
      'title': 'medlink status',
      'lang.en': 'English',
      'lang.zh': '中文',
      'alerts': 'Active alerts',
      'alerts.none': 'No active alerts',
      'throughput': 'Throughput, last hour',
      'throughput.per': '(messages per minute)',
      'nodes': 'Nodes',
      'overdue': 'Overdue cases',
      'dlq': 'Dead letters',
      'expiry': 'Certificates and CRL',
      'col.node': 'Node',
      'col.role': 'Role',
      'col.state': 'State',
      'col.lastSeen': 'Last seen',
      'col.backlog': 'Backlog',
      'col.oldest': 'Oldest queued',
      'col.inFlight': 'In flight',
      'col.delivered': 'Delivered',
      'col.case': 'Case',
      'col.kind': 'Kind',
      'col.caseState': 'State',
      'col.expected': 'Due state',
      'col.target': 'Held by',
      'col.priority': 'Priority',
      'col.overdueBy': 'Overdue by',
      'col.escalations': 'Escalations',
      'col.message': 'Message',
      'col.msgKind': 'Kind',
      'col.from': 'From',
      'col.to': 'To',
      'col.reason': 'Reason',
      'col.when': 'When',
      'col.what': 'What',
      'col.notAfter': 'Expires',
      'col.daysLeft': 'Days left',
      'online': 'online',
      'offline': 'offline',
      'never': 'never',
      'none': 'None',
      'ok': 'OK',
      'warning': 'expires soon',
      'expired': 'EXPIRED',
      'noExpiry': 'does not expire',
      'health.ok': 'All clear',
      'health.warn': '{0} need attention',
      'health.down': 'Broker unreachable',
      'updated': 'updated {0}',
      'uptime': 'up {0}',
      'ago': '{0} ago',
      'justNow': 'just now',
      'of': '{0} of {1}',
      'shown': 'showing {0} of {1}',
      'unreachable': 'Cannot reach the broker ({0}); retrying every 5 s.',
      'stale': 'Cannot reach the broker ({0}). Showing the data of {1}; retrying every 5 s.',
      'tile.nodes': 'Nodes online',
      'tile.sessions': 'Sessions',
      'tile.open': 'Open cases',
      'tile.overdue': 'Overdue cases',
      'tile.escalations': 'Escalations',
      'tile.dead': 'Dead letters',
      'tile.accepted': 'Accepted',
      'tile.delivered': 'Delivered',
      'tile.refused': 'Refused',
      'tile.alerts': 'Active alerts',
      'series.accepted': 'accepted',
      'series.delivered': 'delivered',
      'series.refused': 'refused',
      'series.dead': 'dead letters',
      'lastHour': '{0} in the last hour',
      'axis.now': 'now',
      'axis.min': '−{0} min',
      'alert.node_offline': 'Node offline',
      'alert.expiry': 'Expiry',
      'alert.store_full': 'Store nearly full',
      'alert.dlq': 'Dead letters',
      'since': 'since {0}',
      'unit.s': '{0}s',
      'unit.m': '{0}m',
      'unit.h': '{0}h',
      'unit.d': '{0}d',
      'role.TOWNSHIP_CLINIC': 'Township clinic',
      'role.VILLAGE_CLINIC': 'Village clinic',
      'role.COUNTY_HOSPITAL': 'County hospital',
      'role.CITY_HOSPITAL': 'City hospital',
      'role.IMAGING_CENTRE': 'Imaging centre',
      'role.OPS': 'Operations',
      'kind.CASE_REFERRAL': 'Referral',
      'kind.CASE_IMAGING': 'Imaging',
      'kind.CASE_DOWN_TRANSFER': 'Down-transfer',
      'prio.ROUTINE': 'ROUTINE',
      'prio.URGENT': 'URGENT',
      'prio.EMERGENCY': 'EMERGENCY',
      'footer.refresh': 'Refreshes every 5 s',
      'footer.nopatient': 'No patient data is shown here',
      'footer.utc': 'Times in UTC',
    },
    zh: {
      'title': 'medlink 运行状态',
      'lang.en': 'English',
      'lang.zh': '中文',
      'alerts': '当前告警',
      'alerts.none': '当前无告警',
      'throughput': '近一小时吞吐量',
      'throughput.per': '（每分钟消息数）',
      'nodes': '节点',
      'overdue': '逾期病例',
      'dlq': '死信',
      'expiry': '证书与吊销列表',
      'col.node': '节点',
      'col.role': '角色',
      'col.state': '状态',
      'col.lastSeen': '最后在线',
      'col.backlog': '积压',
      'col.oldest': '最早排队',
      'col.inFlight': '传输中',
      'col.delivered': '已投递',
      'col.case': '病例',
      'col.kind': '类型',
      'col.caseState': '状态',
      'col.expected': '应达状态',
      'col.target': '当前负责方',
      'col.priority': '优先级',
      'col.overdueBy': '逾期时长',
      'col.escalations': '升级上报',
      'col.message': '消息',
      'col.msgKind': '类型',
      'col.from': '发送方',
      'col.to': '接收方',
      'col.reason': '原因',
      'col.when': '时间',
      'col.what': '项目',
      'col.notAfter': '到期时间',
      'col.daysLeft': '剩余天数',
      'online': '在线',
      'offline': '离线',
      'never': '从未',
      'none': '无',
      'ok': '正常',
      'warning': '即将到期',
      'expired': '已过期',
      'noExpiry': '不会过期',
      'health.ok': '一切正常',
      'health.warn': '{0} 项需要处理',
      'health.down': '无法连接中转服务器',
      'updated': '更新于 {0}',
      'uptime': '已运行 {0}',
      'ago': '{0}前',
      'justNow': '刚刚',
      'of': '{0} / {1}',
      'shown': '显示 {0} / 共 {1}',
      'unreachable': '无法连接中转服务器（{0}），每 5 秒重试。',
      'stale': '无法连接中转服务器（{0}）。以下为 {1} 的数据，每 5 秒重试。',
      'tile.nodes': '在线节点',
      'tile.sessions': '会话',
      'tile.open': '未结病例',
      'tile.overdue': '逾期病例',
      'tile.escalations': '升级上报',
      'tile.dead': '死信',
      'tile.accepted': '已接收',
      'tile.delivered': '已投递',
      'tile.refused': '已拒绝',
      'tile.alerts': '当前告警',
      'series.accepted': '已接收',
      'series.delivered': '已投递',
      'series.refused': '已拒绝',
      'series.dead': '死信',
      'lastHour': '近一小时 {0}',
      'axis.now': '现在',
      'axis.min': '−{0} 分钟',
      'alert.node_offline': '节点离线',
      'alert.expiry': '即将到期',
      'alert.store_full': '存储将满',
      'alert.dlq': '死信',
      'since': '始于 {0}',
      'unit.s': '{0}秒',
      'unit.m': '{0}分',
      'unit.h': '{0}小时',
      'unit.d': '{0}天',
      'role.TOWNSHIP_CLINIC': '乡镇卫生院',
      'role.VILLAGE_CLINIC': '村卫生室',
      'role.COUNTY_HOSPITAL': '县医院',
      'role.CITY_HOSPITAL': '市级医院',
      'role.IMAGING_CENTRE': '影像中心',
      'role.OPS': '运维',
      'kind.CASE_REFERRAL': '上转',
      'kind.CASE_IMAGING': '影像会诊',
      'kind.CASE_DOWN_TRANSFER': '下转',
      'prio.ROUTINE': '常规',
      'prio.URGENT': '紧急',
      'prio.EMERGENCY': '危急',
      'footer.refresh': '每 5 秒自动刷新',
      'footer.nopatient': '本页不显示任何患者信息',
      'footer.utc': '时间为 UTC',
    },
  };

  const lang = (document.documentElement.lang || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
  const dict = I18N[lang];

  // The label of key, with {0}, {1}... replaced; the key itself when the
  // dictionary has no such label (a role or kind of a newer broker).
  function t(key, ...args) {
    const s = Object.prototype.hasOwnProperty.call(dict, key) ? dict[key] : null;
    if (s === null) return null;
    return s.replace(/\{(\d)\}/g, (m, i) => String(args[Number(i)]));
  }
  function tr(key, fallback, ...args) {
    const s = t(key, ...args);
    return s === null ? fallback : s;
  }

  // ---- small DOM helpers -------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k of Object.keys(attrs || {})) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // proto3 JSON gives 64-bit numbers as strings.
  function num(v) {
    const n = Number(v || 0);
    return Number.isFinite(n) ? n : 0;
  }
  function fmtInt(n) {
    return num(n).toLocaleString(lang === 'zh' ? 'zh-CN' : 'en-US');
  }

  // "3m 20s", "2h 5m", "4d 1h": the two largest units.
  function fmtDuration(ms) {
    let s = Math.max(0, Math.floor(ms / 1000));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    const parts = [];
    // The largest unit, and the next one when it is not zero.
    const units = [[d, 'unit.d'], [h, 'unit.h'], [m, 'unit.m'], [s, 'unit.s']];
    let i = units.findIndex(([v]) => v > 0);
    if (i < 0) i = 3;
    parts.push(t(units[i][1], units[i][0]));
    if (i < 3 && units[i + 1][0] > 0) parts.push(t(units[i + 1][1], units[i + 1][0]));
    return parts.join(lang === 'zh' ? '' : ' ');
  }
  function fmtAgo(at, now) {
    if (!num(at)) return t('never');
    const ms = now - num(at);
    if (ms < 1500) return t('justNow');
    return t('ago', fmtDuration(ms));
  }
  // 2026-12-07 15:04:05 (UTC, as medlinkctl prints by default).
  function fmtTime(at) {
    if (!num(at)) return '';
    return new Date(num(at)).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '');
  }

  // A table cell with its column's label, shown before the value on a
  // phone where the rows become cards (app.css).
  function cell(row, headers, i, content, cls) {
    const td = el('td', cls || '');
    td.setAttribute('data-label', headers[i]);
    if (content instanceof Node) td.appendChild(content);
    else td.textContent = content === undefined || content === null ? '' : String(content);
    row.appendChild(td);
    return td;
  }
  function headersOf(tbody) {
    return Array.from(tbody.parentNode.querySelectorAll('thead th')).map((th) => th.textContent);
  }
  function emptyRow(tbody, text) {
    const tr = el('tr', 'empty');
    const td = el('td', '', text);
    td.colSpan = tbody.parentNode.querySelectorAll('thead th').length;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  function stacked(main, sub, cls) {
    const d = el('div');
    d.appendChild(el('div', cls || '', main));
    if (sub) d.appendChild(el('div', 'muted small', sub));
    return d;
  }
  function timed(at, now) {
    const d = el('span', '', fmtAgo(at, now));
    if (num(at)) d.title = fmtTime(at) + ' UTC';
    return d;
  }

  // ---- labels --------------------------------------------------------------

  function applyLabels() {
    document.title = t('title');
    for (const e of document.querySelectorAll('[data-i18n]')) e.textContent = t(e.dataset.i18n);
    $('lang-' + lang).classList.add('current');
  }

  // ---- sections ------------------------------------------------------------

  function renderHeader(st) {
    $('broker').textContent = st.broker || '';
    const now = num(st.now);
    $('uptime').textContent = num(st.startedAt) ? t('uptime', fmtDuration(now - num(st.startedAt))) : '';
  }

  function renderAlerts(st) {
    const ul = $('alerts-list');
    clear(ul);
    const alerts = st.alert || [];
    $('alerts').classList.toggle('bad', alerts.length > 0);
    if (!alerts.length) {
      ul.appendChild(el('li', 'none', t('alerts.none')));
      return;
    }
    for (const a of alerts) {
      const li = el('li', 'alert');
      li.appendChild(el('span', 'tag', tr('alert.' + a.kind, a.kind)));
      li.appendChild(el('span', 'mono strong', a.subject));
      li.appendChild(el('span', 'detail', a.detail));
      if (num(a.since)) li.appendChild(el('span', 'muted small', t('since', fmtAgo(a.since, num(st.now)))));
      ul.appendChild(li);
    }
  }

  function tile(parent, label, value, state) {
    const d = el('div', 'tile' + (state ? ' ' + state : ''));
    d.appendChild(el('div', 'value', value));
    d.appendChild(el('div', 'label', label));
    parent.appendChild(d);
  }

  function renderTotals(st, cases) {
    const box = $('totals');
    clear(box);
    const nodes = st.node || [];
    const online = nodes.filter((n) => n.online).length;
    const overdue = num(st.overdueCases);
    const dead = num(st.deadLetters);
    const alerts = (st.alert || []).length;
    let esc = 0;
    for (const c of cases || []) esc += num(c.escalations);
    tile(box, t('tile.nodes'), t('of', online, nodes.length), online < nodes.length ? 'warn' : 'good');
    tile(box, t('tile.alerts'), fmtInt(alerts), alerts ? 'bad' : 'good');
    tile(box, t('tile.overdue'), fmtInt(overdue), overdue ? 'bad' : 'good');
    tile(box, t('tile.escalations'), fmtInt(esc), esc ? 'warn' : '');
    tile(box, t('tile.dead'), fmtInt(dead), dead ? 'bad' : 'good');
    tile(box, t('tile.open'), fmtInt(st.openCases));
    tile(box, t('tile.sessions'), fmtInt(st.sessions));
    tile(box, t('tile.accepted'), fmtInt(st.acceptedTotal));
    tile(box, t('tile.delivered'), fmtInt(st.deliveredTotal));
    tile(box, t('tile.refused'), fmtInt(st.refusedTotal), num(st.refusedTotal) ? 'warn' : '');
  }

  function renderNodes(st) {
    const body = $('nodes-body');
    const h = headersOf(body);
    clear(body);
    const now = num(st.now);
    const nodes = (st.node || []).slice();
    // Offline first, then the longest backlog: what needs a look comes first.
    nodes.sort((a, b) => (a.online === b.online ? 0 : a.online ? 1 : -1) ||
      num(b.queueDepth) - num(a.queueDepth) || String(a.nodeId).localeCompare(String(b.nodeId)));
    const online = nodes.filter((n) => n.online).length;
    $('nodes-count').textContent = t('of', online, nodes.length) + ' ' + t('online');
    if (!nodes.length) emptyRow(body, t('none'));
    for (const n of nodes) {
      const row = el('tr', n.online ? '' : 'off');
      row.id = 'node-' + n.nodeId;
      cell(row, h, 0, stacked(n.nodeId, n.displayName, 'mono strong'), 'node');
      cell(row, h, 1, tr('role.' + n.role, n.role));
      cell(row, h, 2, el('span', 'pill ' + (n.online ? 'good' : 'bad'), t(n.online ? 'online' : 'offline')));
      cell(row, h, 3, timed(n.lastSeen, now));
      cell(row, h, 4, fmtInt(n.queueDepth), 'num' + (num(n.queueDepth) ? ' strong' : ''));
      const oldest = num(n.oldestQueuedAt);
      cell(row, h, 5, oldest ? fmtDuration(now - oldest) : '—', oldest && now - oldest > 3600000 ? 'hot' : '');
      cell(row, h, 6, fmtInt(n.inFlight), 'num');
      cell(row, h, 7, fmtInt(n.delivered), 'num');
      body.appendChild(row);
    }
  }

  function renderOverdue(st, cases) {
    const body = $('overdue-body');
    const h = headersOf(body);
    clear(body);
    const now = num(st.now);
    const list = (cases || []).slice(0, MAX_ROWS);
    const total = num(st.overdueCases);
    $('overdue-count').textContent = list.length < total ? t('shown', list.length, total) : '(' + fmtInt(total) + ')';
    $('overdue').classList.toggle('bad', total > 0);
    if (!list.length) emptyRow(body, t('none'));
    for (const c of list) {
      const row = el('tr');
      row.id = 'case-' + c.caseId;
      cell(row, h, 0, c.caseId, 'mono');
      cell(row, h, 1, tr('kind.' + c.kind, c.kind));
      cell(row, h, 2, c.state, 'mono small');
      cell(row, h, 3, c.deadlineState, 'mono small');
      cell(row, h, 4, c.target, 'mono');
      cell(row, h, 5, el('span', 'prio ' + String(c.priority).toLowerCase(), tr('prio.' + c.priority, c.priority)));
      const by = num(c.deadlineAt) ? fmtDuration(now - num(c.deadlineAt)) : '';
      const td = cell(row, h, 6, by, 'hot');
      if (num(c.deadlineAt)) td.title = fmtTime(c.deadlineAt) + ' UTC';
      cell(row, h, 7, fmtInt(c.escalations), 'num');
      body.appendChild(row);
    }
  }

  function renderDlq(st, dead) {
    const body = $('dlq-body');
    const h = headersOf(body);
    clear(body);
    const now = num(st.now);
    const list = (dead || []).slice(0, MAX_ROWS);
    const total = num(st.deadLetters);
    $('dlq-count').textContent = list.length < total ? t('shown', list.length, total) : '(' + fmtInt(total) + ')';
    $('dlq').classList.toggle('bad', total > 0);
    if (!list.length) emptyRow(body, t('none'));
    for (const d of list) {
      const row = el('tr');
      row.id = 'dead-' + d.messageId;
      cell(row, h, 0, d.messageId, 'mono');
      cell(row, h, 1, d.caseId, 'mono');
      cell(row, h, 2, d.kind, 'mono small');
      cell(row, h, 3, d.from, 'mono');
      cell(row, h, 4, d.to, 'mono');
      cell(row, h, 5, d.reason, 'reason');
      cell(row, h, 6, stacked(fmtAgo(d.deadAt, now), fmtTime(d.deadAt).slice(0, 16)), 'time');
      body.appendChild(row);
    }
  }

  function renderExpiry(st) {
    const body = $('expiry-body');
    const h = headersOf(body);
    clear(body);
    const list = st.expiry || [];
    $('expiry').classList.toggle('bad', list.some((x) => x.warning || x.expired));
    if (!list.length) emptyRow(body, t('none'));
    for (const x of list) {
      const state = x.expired ? 'bad' : x.warning ? 'warn' : 'good';
      const row = el('tr', x.warning || x.expired ? 'flag ' + state : '');
      cell(row, h, 0, x.what, 'mono small what');
      cell(row, h, 1, num(x.notAfter) ? fmtTime(x.notAfter).slice(0, 10) : t('noExpiry'), 'time');
      cell(row, h, 2, num(x.notAfter) ? fmtInt(x.daysLeft) : '—', 'num strong');
      cell(row, h, 3, el('span', 'pill ' + state, t(x.expired ? 'expired' : x.warning ? 'warning' : 'ok')));
      body.appendChild(row);
    }
  }

  // ---- the chart -------------------------------------------------------------

  const SERIES = [
    ['accepted', 's-accepted'],
    ['delivered', 's-delivered'],
    ['refused', 's-refused'],
    ['dead', 's-dead'],
  ];

  // The top of the y axis: four steps of 1, 2 or 5 x 10^n, so that every
  // grid line is a whole number of messages.
  function niceMax(v) {
    const want = Math.max(1, v / 4);
    const p = Math.pow(10, Math.floor(Math.log10(want)));
    for (const m of [1, 2, 5, 10]) if (m * p >= want) return 4 * m * p;
    return 40 * p;
  }

  function renderChart(tp) {
    const box = $('chart');
    clear(box);
    // Drawn at the size it is shown, so that its labels keep their size on
    // a phone.
    const W = Math.max(300, Math.round(box.clientWidth || 720));
    const H = W < 520 ? 170 : 220, L = 44, R = 12, T = 12, B = 26;
    const n = (tp.accepted || []).length;
    let max = 0;
    for (const [k] of SERIES) for (const v of tp[k] || []) max = Math.max(max, num(v));
    const top = niceMax(max);
    const x = (i) => L + (n > 1 ? (i * (W - L - R)) / (n - 1) : 0);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const s = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, class: 'plot', role: 'img',
      'aria-label': t('throughput') });
    for (let g = 0; g <= 4; g++) {
      const v = (top * g) / 4;
      s.appendChild(svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: g ? 'grid' : 'axis' }));
      s.appendChild(svg('text', { x: L - 6, y: y(v) + 4, class: 'tick', 'text-anchor': 'end' }, fmtInt(v)));
    }
    const minutes = n * num(tp.bucketSeconds || 60) / 60;
    for (const m of [60, 45, 30, 15, 0]) {
      if (m > minutes) continue;
      const i = n - 1 - (m * 60) / num(tp.bucketSeconds || 60);
      const label = m ? t('axis.min', m) : t('axis.now');
      s.appendChild(svg('text', { x: x(i), y: H - 6, class: 'tick',
        'text-anchor': m === 0 ? 'end' : i <= 0 ? 'start' : 'middle' }, label));
    }
    for (const [k, cls] of SERIES) {
      const vals = (tp[k] || []).map(num);
      if (!vals.length) continue;
      const pts = vals.map((v, i) => x(i).toFixed(1) + ',' + y(v).toFixed(1)).join(' ');
      if (k === 'accepted') {
        const area = 'M' + x(0) + ',' + y(0) + ' L' + pts.split(' ').join(' L') + ' L' + x(n - 1) + ',' + y(0) + ' Z';
        s.appendChild(svg('path', { d: area, class: 'area ' + cls }));
      }
      s.appendChild(svg('polyline', { points: pts, class: 'line ' + cls }));
    }
    box.appendChild(s);

    const legend = $('legend');
    clear(legend);
    for (const [k, cls] of SERIES) {
      const sum = (tp[k] || []).reduce((a, v) => a + num(v), 0);
      const li = el('li');
      li.appendChild(el('span', 'swatch ' + cls));
      li.appendChild(el('span', 'strong', t('series.' + k)));
      li.appendChild(el('span', 'muted', t('lastHour', fmtInt(sum))));
      legend.appendChild(li);
    }
  }

  // ---- the health summary ----------------------------------------------------

  function renderHealth(st, ok) {
    const pill = $('health');
    if (!ok) {
      pill.className = 'pill bad';
      pill.textContent = t('health.down');
      return;
    }
    const issues = (st.alert || []).length + (num(st.overdueCases) ? 1 : 0) + (num(st.deadLetters) ? 1 : 0) +
      (st.expiry || []).filter((x) => x.warning || x.expired).length;
    pill.className = 'pill ' + (issues ? 'warn' : 'good');
    pill.textContent = issues ? t('health.warn', issues) : t('health.ok');
  }

  // ---- fetching --------------------------------------------------------------

  async function getJson(path) {
    const r = await fetch(path, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
    return r.json();
  }

  let lastGood = 0;

  async function refresh() {
    const [st, cases, dlq, tp] = await Promise.allSettled([
      getJson('api/v1/status'),
      getJson('api/v1/cases?overdue=1&limit=' + MAX_ROWS),
      getJson('api/v1/dlq?limit=' + MAX_ROWS),
      getJson('api/v1/throughput'),
    ]);
    const banner = $('banner');
    if (st.status !== 'fulfilled') {
      renderHealth(null, false);
      banner.hidden = false;
      const why = st.reason && st.reason.message ? st.reason.message : '?';
      banner.textContent = lastGood ? t('stale', why, fmtTime(lastGood) + ' UTC') : t('unreachable', why);
      return;
    }
    banner.hidden = true;
    const s = st.value;
    lastGood = num(s.now) || Date.now();
    const caseList = cases.status === 'fulfilled' ? (cases.value.cases || []) : null;
    renderHeader(s);
    renderHealth(s, true);
    renderAlerts(s);
    renderTotals(s, caseList);
    renderNodes(s);
    if (caseList) renderOverdue(s, caseList);
    if (dlq.status === 'fulfilled') renderDlq(s, dlq.value.deadLetter || []);
    renderExpiry(s);
    if (tp.status === 'fulfilled') renderChart(tp.value);
    $('updated').textContent = t('updated', fmtTime(lastGood).slice(11) + ' UTC');
    document.body.classList.add('loaded');
  }

  function loop() {
    refresh()
      .catch(() => {})
      .then(() => setTimeout(loop, REFRESH_MS));
  }

  applyLabels();
  loop();
})();
