"""The chat room's data in Redis: the key layout, and every mutation as one Lua script.

Each flow of docs/SCALEOUT.md that changes shared state is one script, so it is
atomic and all nodes see one order. ``ChatKeys(prefix)`` names the keys and
builds each script's call: ``link.eval(callback, *keys.bm(...))``.

Key layout (``prefix`` is ``chat:``; ``<name>`` is a lower-cased user name,
``<node>`` a node id, which never contains ``/``):

==========================  ==========  ==============================================
key                         type        holds
==========================  ==========  ==============================================
``chat:acct:<name>``        hash        the account: fields chosen by the caller (e.g.
                                        ``username`` and ``json``), written once
``chat:room``               stream      the room log: one entry per BM, field ``e`` = its
                                        history line (JSON, no newline), ``MAXLEN ~``
``chat:hist:<name>``        stream      the user's own history (``MAXLEN ~``): ``t=on at=<id>``
                                        (came online when the room log's last id was
                                        ``<id>``), ``t=off at=<id>``, ``t=pm at=<id> e=<line>``;
                                        an entry with only ``e`` is a line of the older
                                        per-recipient layout (BM or PM), read as it is
``chat:online``             hash        ``<name>`` -> the session's record (JSON from
                                        the node: node, token, spelling, key, fingerprint)
``chat:sess:<name>``        string      the session token ``<node>/<connection>``
``chat:node:<node>``        string      the node's lease (value: its id), ``PX`` expiry
``chat:nodes``              sorted set  registered nodes, scored by registration time (ms)
``chat:nodeusers:<node>``   set         names with a session on that node
``chat:ev``                 stream      events for every node (``MAXLEN ~``)
``chat:in:<node>``          stream      events for one node's users (``MAXLEN ~``)
``chat:inpos:<node>``       string      the last entry of its inbox the node had handed to its
                                        sessions at its last lease renewal (``reap_node`` hands on the rest)
``chat:mod``                hash        bans and mutes in force: ``ban:<name>`` /
                                        ``mute:<name>`` -> the action (JSON,
                                        ``store.ModRecord``); expired ones may linger
``chat:modlog``             stream      every moderation action, field ``e`` = its JSON
                                        (``MAXLEN ~``): the audit trail
``chat:lastkey``            hash        ``<name>`` -> the key (key form) the account last
                                        gave in KEY: TARGET gives it out while it is offline
``chat:off:<name>``         list        the PMs kept for an offline user, oldest first: each
                                        the ``D PM`` body with ``"offline":true``; at most the
                                        bound (``--offline-limit``); taken whole by ``go_online``
``chat:off:<name>:from``    hash        ``<sender>`` -> how many of those it sent (at most
                                        ``--offline-per-sender``); dropped with the list
``chat:pmids:<name>``       sorted set  the PM ids the user sent lately, scored by their
                                        ``sent`` (seconds); at most PM_IDS_PER_SENDER, those
                                        past ``sent`` + the window dropped (``pmguard.UsedIds``)
``chat:pmfloor:<name>``     string      the ``sent`` of the newest id forgotten to stay in
                                        that bound: PMs sent no later are refused
==========================  ==========  ==============================================

Stream entries (field ``t`` says which):

* ``chat:ev``  ``t=bm from=<name> d=<payload>``: a broadcast, stored once in
  ``chat:room``; it is in the history of everyone online when it ran (their
  ``on`` mark is older, their ``off`` mark newer);
* ``chat:ev``  ``t=on u=<name> tok=<token> rec=<record>``: came online;
* ``chat:ev``  ``t=off u=<name> tok=<token>``: went offline (logout,
  takeover, reap);
* ``chat:in:<node>``  ``t=pm from=<name> to=<name> tok=<token> d=<payload>``:
  a private message for that exact session;
* ``chat:in:<node>``  ``t=kick u=<name> tok=<token>``: that session was
  replaced (``BYE replaced``);
* ``chat:ev``  ``t=mod u=<name> d=<action JSON>``: a moderation action
  (docs/PROTOCOL.md section 10); every node enforces it on its own users
  (a kick or ban ends the session there, a mute holds its BMs) and tells them.

BM and PM take the sender's session token too (optional): a node that lost
its users to a reap or a takeover cannot store messages in their name.

Invariants the scripts keep: ``chat:online`` has ``<name>`` only while
``chat:sess:<name>`` holds the token of the session that went online; a
session is in ``chat:nodeusers:<node>`` of the node in its token. So a
takeover, a logout and a reap each remove exactly one session's presence,
and a stale node (an old token) can change nothing.

Every reply is an array whose first element is the outcome (1 done, 0 refused)
unless said otherwise; a missing value is the empty string.

A user's history is its ``chat:hist`` stream merged with the room log by the
``history`` script: the BMs with ids above an ``on`` mark's ``at`` and up to the
next ``off`` mark's ``at`` (or the end, while online), interleaved with the PMs
by their ``at``; a PM's ``at`` is the room log's last id when it was stored. Every
script that puts a user online or takes it off writes its mark, in the same
step, so spans are exact; a BM costs the same whatever the room's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from protocol import PM_CLOCK_WINDOW, PM_IDS_PER_SENDER, TS_ORDER_SLACK, ts_before
from redislink import Script
from store import PmId

# Enough events for a node to resume after a Redis blip or a slow pass without
# a gap, yet bounded (about 100,000 x a few hundred bytes).
EV_MAXLEN = 100_000
MODLOG_MAXLEN = 100_000   # moderation actions kept in Redis's audit trail (the server logs keep them all)
INBOX_MAXLEN = 100_000
# Defaults for --history-limit's default (512 MiB): about 1 M BMs, 130 k entries per user.
ROOM_MAXLEN = 1_000_000
HIST_MAXLEN = 131_072
HISTORY_PAGE = 1000   # the history script reads streams in pieces of this many entries
FORWARD_WANT = 500    # the history_forward script returns at most this many entries a call
FORWARD_WORK = 5000   # and looks at at most this many stream rows (a call is short however long the history)
FORWARD_BYTES = 256 * 1024   # and stops once its entries are this long (a node holds about two pieces a reader)
# Its cursor at the start: the user's stream from its first row, not in a span, ends not taken yet.
FORWARD_START = ("-", "0", "-", "", "", "0")
LEASE_MS = 5000     # docs/SCALEOUT.md: a 5 s lease, renewed every second

# Lua helpers shared by the scripts (each script is sent whole).
_NODE_OF = """
local function node_of(token)
  return string.match(token, '^(.*)/') or token
end
"""

# The room log's last id ('0-0' while empty): where a user's marks and PMs stand in it.
_ROOM_LAST = """
local function room_last(p)
  local last = redis.call('XREVRANGE', p .. 'room', '+', '-', 'COUNT', 1)
  if last[1] then
    return last[1][1]
  end
  return '0-0'
end
"""

# A message script's first check: is the sender's session still the one that sent it?
# Returns nil if so (or if no token was given), else the session's current token or ''.
_SENDER_GONE = """
local function sender_gone(p, sender, token)
  if token == '' then
    return nil
  end
  local current = redis.call('GET', p .. 'sess:' .. sender)
  if current ~= token then
    return current or ''
  end
  return nil
end
"""

# A PM2's id, checked and recorded by the rule of pmguard.UsedIds, for the whole room.
# ARGV-style arguments as strings: sender, id ('' = a PM1, nothing to check), sent and now
# (seconds), window (seconds), per-sender bound. Returns nil if the id may be used (it is
# recorded), else 'used' or 'floor'.
_PM_ID_USED = """
local function pm_id_used(p, sender, id, sent, now, window, bound)
  if id == '' then
    return nil
  end
  local ids, floor_key = p .. 'pmids:' .. sender, p .. 'pmfloor:' .. sender
  local sent_at, now_at, span = tonumber(sent), tonumber(now), tonumber(window)
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', '(' .. (now_at - span))
  if redis.call('ZSCORE', ids, id) then
    return 'used'
  end
  local floor = tonumber(redis.call('GET', floor_key) or '')
  if floor and sent_at <= floor then
    return 'floor'
  end
  redis.call('ZADD', ids, sent, id)
  redis.call('PEXPIRE', ids, math.ceil(2 * span * 1000))
  if redis.call('ZCARD', ids) > tonumber(bound) then
    local oldest = redis.call('ZPOPMIN', ids)
    local forgotten = tonumber(oldest[2])
    if not floor or forgotten > floor then
      floor = forgotten
      redis.call('SET', floor_key, oldest[2], 'PX', math.max(1, math.ceil((floor + span - now_at) * 1000)))
    end
  end
  return nil
end
"""

CREATE_ACCOUNT = Script("create_account", "Create an account hash unless the name exists: 1 created, 0 taken.", """
-- KEYS[1] acct key; ARGV field, value, ...
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
""")

BM = Script("bm", "Append a broadcast to the room log once, then XADD it to chat:ev.", _SENDER_GONE + """
-- KEYS[1] online, KEYS[2] ev; ARGV prefix, sender, line, payload, ev maxlen,
-- the sender's session token ('' = do not check), room maxlen.
-- Returns {1, recipients (online users but the sender), event id},
-- or {0, the sender's current token or ''} when its session is not that token (stored nothing).
local sender = ARGV[2]
local gone = sender_gone(ARGV[1], sender, ARGV[6])
if gone then
  return {0, gone}
end
local count = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], sender)
redis.call('XADD', ARGV[1] .. 'room', 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[3])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 't', 'bm', 'from', sender, 'd', ARGV[4])
return {1, count, id}
""")

PM = Script("pm", "If the target's session token is the one expected and the PM's id is unused, store a PM "
            "in both histories and XADD it to the target node's inbox.",
            _NODE_OF + _ROOM_LAST + _SENDER_GONE + _PM_ID_USED + """
-- KEYS[1] the target's sess key; ARGV prefix, sender, target, expected token,
-- sender's line, target's line, payload, inbox maxlen, the sender's token ('' = do not check),
-- history maxlen, then the id check's: id, sent, now, window, bound.
-- Returns {1, inbox entry id}; {0, the target's current token or ''} (not_online);
-- {-1, the sender's current token or ''} (the sender's session is not that token);
-- {-2, 'used' or 'floor'} (the id: nothing stored).
local p = ARGV[1]
local gone = sender_gone(p, ARGV[2], ARGV[9])
if gone then
  return {-1, gone}
end
local token = redis.call('GET', KEYS[1])
if token ~= ARGV[4] then
  return {0, token or ''}
end
local used = pm_id_used(p, ARGV[2], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15])
if used then
  return {-2, used}
end
local at = room_last(p)
redis.call('XADD', p .. 'hist:' .. ARGV[2], 'MAXLEN', '~', ARGV[10], '*', 't', 'pm', 'at', at, 'e', ARGV[5])
redis.call('XADD', p .. 'hist:' .. ARGV[3], 'MAXLEN', '~', ARGV[10], '*', 't', 'pm', 'at', at, 'e', ARGV[6])
local id = redis.call('XADD', p .. 'in:' .. node_of(token), 'MAXLEN', '~', ARGV[8], '*',
                      't', 'pm', 'from', ARGV[2], 'to', ARGV[3], 'tok', token, 'd', ARGV[7])
return {1, id}
""")

PM_OFFLINE = Script("pm_offline", "A PM that may be kept (TARGET asked for offline): delivered live if the "
                    "target is online now, else kept for it (within the bound) and stored in both histories.",
                    _NODE_OF + _ROOM_LAST + _SENDER_GONE + _PM_ID_USED + """
-- KEYS[1] online; ARGV prefix, sender, target, sender's line, target's line, live payload, kept payload,
-- inbox maxlen, the sender's token ('' = do not check), history maxlen, bound,
-- then the id check's: id, sent, now, window, bound; then the bound for one sender (0: none).
-- Returns {1, inbox entry id} (online: delivered live); {2, PMs kept} (kept); {3, PMs kept} (at the bound:
-- nothing stored); {4, the sender's PMs kept} (at the sender's bound: nothing stored);
-- {-1, the sender's current token or ''} (the sender's session is not that token);
-- {-2, 'used' or 'floor'} (the id: nothing stored).
local p = ARGV[1]
local gone = sender_gone(p, ARGV[2], ARGV[9])
if gone then
  return {-1, gone}
end
local token = nil
local record = redis.call('HGET', KEYS[1], ARGV[3])
if record then
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded['token']) == 'string' then
    token = decoded['token']
  end
end
local box = p .. 'off:' .. ARGV[3]
local count = 0
if not token then
  count = redis.call('LLEN', box)
  if count >= tonumber(ARGV[11]) then
    return {3, count}
  end
  local share = tonumber(ARGV[17]) or 0
  local mine = tonumber(redis.call('HGET', box .. ':from', ARGV[2]) or '0')
  if share > 0 and mine >= share then
    return {4, mine}
  end
end
local used = pm_id_used(p, ARGV[2], ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16])
if used then
  return {-2, used}
end
local at = room_last(p)
redis.call('XADD', p .. 'hist:' .. ARGV[2], 'MAXLEN', '~', ARGV[10], '*', 't', 'pm', 'at', at, 'e', ARGV[4])
redis.call('XADD', p .. 'hist:' .. ARGV[3], 'MAXLEN', '~', ARGV[10], '*', 't', 'pm', 'at', at, 'e', ARGV[5])
if token then
  local id = redis.call('XADD', p .. 'in:' .. node_of(token), 'MAXLEN', '~', ARGV[8], '*',
                        't', 'pm', 'from', ARGV[2], 'to', ARGV[3], 'tok', token, 'd', ARGV[6])
  return {1, id}
end
redis.call('HINCRBY', box .. ':from', ARGV[2], 1)
return {2, redis.call('RPUSH', box, ARGV[7])}
""")

LAST_KEY = Script("last_key", "An account's registered spelling and its last key (read only).", """
-- KEYS[1] acct key, KEYS[2] lastkey; ARGV name.  Returns {spelling or '', key or ''}.
return {redis.call('HGET', KEYS[1], 'username') or '', redis.call('HGET', KEYS[2], ARGV[1]) or ''}
""")

TAKE_OFFLINE = Script("take_offline", "Take the PMs kept for a user, oldest first, and forget them.", """
-- KEYS[1] the user's off key.  Returns the kept D PM bodies.
local kept = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1], KEYS[1] .. ':from')
return kept
""")

LOGIN_SWAP = Script("login_swap", "Set the session token (compare-and-set if an old one is given); KICK the "
                    "replaced session on its node and mark it offline.", _NODE_OF + _ROOM_LAST + """
-- KEYS[1] sess key, KEYS[2] online, KEYS[3] ev; ARGV prefix, name, new token,
-- expected old token ('' = whatever it is), ev maxlen, inbox maxlen, history maxlen.
-- Returns {1, old token or '', offline event id or ''} or {0, current token or ''}.
local p, name, new = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('GET', KEYS[1])
if ARGV[4] ~= '' and old ~= ARGV[4] then
  return {0, old or ''}
end
redis.call('SET', KEYS[1], new)
local new_node = node_of(new)
redis.call('SADD', p .. 'nodeusers:' .. new_node, name)
local offline = ''
if old ~= new then
  if old then
    local old_node = node_of(old)
    if old_node ~= new_node then
      redis.call('SREM', p .. 'nodeusers:' .. old_node, name)
    end
    -- A dead node's inbox is read by no one (and was deleted by its reap).
    if redis.call('EXISTS', p .. 'node:' .. old_node) == 1 then
      redis.call('XADD', p .. 'in:' .. old_node, 'MAXLEN', '~', ARGV[6], '*', 't', 'kick', 'u', name, 'tok', old)
    end
  end
  if redis.call('HDEL', KEYS[2], name) == 1 then
    redis.call('XADD', p .. 'hist:' .. name, 'MAXLEN', '~', ARGV[7], '*', 't', 'off', 'at', room_last(p))
    offline = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 't', 'off', 'u', name, 'tok', old or '')
  end
end
return {1, old or '', offline}
""")

GO_ONLINE = Script("go_online", "Only if the session token is still ours: HSET chat:online, SADD nodeusers, "
                   "XADD the online event.", _NODE_OF + _ROOM_LAST + """
-- KEYS[1] sess key, KEYS[2] online, KEYS[3] ev; ARGV prefix, name, token, record, ev maxlen, history maxlen,
-- recent (how many of the room's newest BMs to return), since (only BMs with a ts at or after it; '' for all),
-- floor (reading back stops at the first BM with a ts before it: BMs are not stored in ts order).
-- Returns {1, online event id, the PMs kept for it (taken), the room's newest BMs, newest first}
-- or {0, current token or ''}.
local token = redis.call('GET', KEYS[1])
if token ~= ARGV[3] then
  return {0, token or ''}
end
if redis.call('HSET', KEYS[2], ARGV[2], ARGV[4]) == 1 then
  redis.call('XADD', ARGV[1] .. 'hist:' .. ARGV[2], 'MAXLEN', '~', ARGV[6], '*', 't', 'on', 'at', room_last(ARGV[1]))
end
redis.call('SADD', ARGV[1] .. 'nodeusers:' .. node_of(token), ARGV[2])
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 't', 'on', 'u', ARGV[2], 'tok', token,
                      'rec', ARGV[4])
-- The PMs kept while it was offline go to this login, and to no other (docs/PROTOCOL.md section 5).
local box = ARGV[1] .. 'off:' .. ARGV[2]
local kept = redis.call('LRANGE', box, 0, -1)
redis.call('DEL', box, box .. ':from')
local recent = {}
local count = tonumber(ARGV[7]) or 0
if count > 0 then
  local since, floor = ARGV[8] or '', ARGV[9] or ''
  for _, row in ipairs(redis.call('XREVRANGE', ARGV[1] .. 'room', '+', '-', 'COUNT', count)) do
    local ts = since
    if since ~= '' then
      local ok, entry = pcall(cjson.decode, row[2][2])
      if not ok or type(entry) ~= 'table' or type(entry.ts) ~= 'string' or entry.ts < floor then
        break
      end
      ts = entry.ts
    end
    if ts >= since then
      recent[#recent + 1] = row[2][2]
    end
  end
end
return {1, id, kept, recent}
""")

LOGOUT = Script("logout", "Compare-and-delete the session token; if it was ours, HDEL online, SREM nodeusers "
                "and XADD the offline event.", _NODE_OF + _ROOM_LAST + """
-- KEYS[1] sess key, KEYS[2] online, KEYS[3] ev; ARGV prefix, name, token, ev maxlen, history maxlen.
-- Returns {1, offline event id or '' (was not online)} or {0, current token or ''}.
local token = redis.call('GET', KEYS[1])
if token ~= ARGV[3] then
  return {0, token or ''}
end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[1] .. 'nodeusers:' .. node_of(token), ARGV[2])
local offline = ''
if redis.call('HDEL', KEYS[2], ARGV[2]) == 1 then
  redis.call('XADD', ARGV[1] .. 'hist:' .. ARGV[2], 'MAXLEN', '~', ARGV[5], '*', 't', 'off', 'at', room_last(ARGV[1]))
  offline = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 't', 'off', 'u', ARGV[2], 'tok', token)
end
return {1, offline}
""")

REGISTER_NODE = Script("register_node", "Take a new node's lease (SET NX PX) and add it to chat:nodes: 1, "
                       "or 0 if the id is taken.", """
-- KEYS[1] node key, KEYS[2] nodes; ARGV node id, lease ms.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local now = redis.call('TIME')
redis.call('ZADD', KEYS[2], string.format('%.0f', now[1] * 1000 + math.floor(now[2] / 1000)), ARGV[1])
return 1
""")

RENEW_LEASE = Script("renew_lease", "Extend the node's own lease (SET XX PX): 1, or 0 if it expired or is not "
                     "ours (the node is fenced).", """
-- KEYS[1] node key, KEYS[2] its inbox position key; ARGV node id, lease ms, the last inbox entry it has
-- read ('' = none yet).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])
if (ARGV[3] or '') ~= '' then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
""")

DEAD_NODES = Script("dead_nodes", "The ids in chat:nodes whose lease has expired (to reap).", """
-- KEYS[1] nodes; ARGV prefix.  Returns a list of node ids.
local dead = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. id) == 0 then
    dead[#dead + 1] = id
  end
end
return dead
""")

REAP_NODE = Script("reap_node", "Log out every session of a node whose lease has expired, atomically, "
                   "hand on the PMs in its inbox it may not have read, and forget the node.",
                   _NODE_OF + _ROOM_LAST + """
-- KEYS[1] nodes, KEYS[2] online, KEYS[3] ev; ARGV prefix, node id, ev maxlen, history maxlen, inbox maxlen,
-- the last inbox entry it read ('' = the one its last lease renewal recorded).
-- Returns {1, sessions ended, offline events, PMs handed on} or {0, 0, 0, 0} if the lease is still held.
-- A PM in its inbox after that entry (a node that died had perhaps not read it, or not sent it to the
-- client) is marked "offline":true, as a kept PM is, and goes to its target's session if it is online
-- on another node now, else it is kept for the target's next login: SEND ok said it was delivered, so
-- it is not left in history alone. A client that has shown it already knows it by its id.
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'node:' .. id) == 1 then
  return {0, 0, 0, 0}
end
local ended, offline = 0, 0
for _, name in ipairs(redis.call('SMEMBERS', p .. 'nodeusers:' .. id)) do
  local sess = p .. 'sess:' .. name
  local token = redis.call('GET', sess)
  if token and node_of(token) == id then
    redis.call('DEL', sess)
    ended = ended + 1
    if redis.call('HDEL', KEYS[2], name) == 1 then
      redis.call('XADD', p .. 'hist:' .. name, 'MAXLEN', '~', ARGV[4], '*', 't', 'off', 'at', room_last(p))
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 't', 'off', 'u', name, 'tok', token)
      offline = offline + 1
    end
  end
end
local inbox, handed = p .. 'in:' .. id, 0
local read = ARGV[6] or ''
if read == '' then
  read = redis.call('GET', p .. 'inpos:' .. id) or '0-0'
end
for _, row in ipairs(redis.call('XRANGE', inbox, '(' .. read, '+')) do
  local f = {}
  for i = 1, #row[2], 2 do
    f[row[2][i]] = row[2][i + 1]
  end
  if f.t == 'pm' and f.to and f.from and f.d and string.sub(f.d, -1) == '}' then
    local kept = string.sub(f.d, 6, -2) .. ',"offline":true}'
    local now = redis.call('GET', p .. 'sess:' .. f.to)
    if now and node_of(now) ~= id then
      redis.call('XADD', p .. 'in:' .. node_of(now), 'MAXLEN', '~', ARGV[5], '*', 't', 'pm', 'from', f.from,
                 'to', f.to, 'tok', now, 'd', 'D' .. struct.pack('>I4', #kept) .. kept)
    else
      local box = p .. 'off:' .. f.to
      redis.call('RPUSH', box, kept)
      redis.call('HINCRBY', box .. ':from', f.from, 1)
    end
    handed = handed + 1
  end
end
redis.call('DEL', p .. 'nodeusers:' .. id, inbox, p .. 'inpos:' .. id)
redis.call('ZREM', KEYS[1], id)
return {1, ended, offline, handed}
""")

HISTORY = Script("history", "A user's history (read only): its stream merged with the room log's BMs of its "
                 "online spans, newest first, at most limit entries.", """
-- KEYS[1] the user's hist key; ARGV prefix, limit (0 = all), page size.
-- Returns the entries' JSON lines, oldest first.
local room = ARGV[1] .. 'room'
local need = tonumber(ARGV[2])
local page = tonumber(ARGV[3])
if need == 0 then
  need = 1e15
end
local out = {}
local function bms(lo, hi)   -- the room's lines with ids in (lo, hi], newest first
  while #out < need do
    local count = math.min(need - #out, page)
    local rows = redis.call('XREVRANGE', room, hi, '(' .. lo, 'COUNT', count)
    for _, row in ipairs(rows) do
      out[#out + 1] = row[2][2]
    end
    if #rows < count then
      return
    end
    hi = '(' .. rows[#rows][1]
  end
end
local function alone(between)
  for _, item in ipairs(between) do
    if #out >= need then
      return
    end
    out[#out + 1] = item[3]
  end
end
local function span(between, lo, hi)
  for _, item in ipairs(between) do
    bms(item[2], hi)
    hi = item[2]
    if #out >= need then
      return
    end
    out[#out + 1] = item[3]
  end
  bms(lo, hi)
end
local later, between = nil, {}
local top = '+'
while #out < need do
  local rows = redis.call('XREVRANGE', KEYS[1], top, '-', 'COUNT', page)
  for _, row in ipairs(rows) do
    local f = {}
    for i = 1, #row[2], 2 do
      f[row[2][i]] = row[2][i + 1]
    end
    if f.t == 'on' then
      span(between, f.at, later and later[2] or '+')
      later, between = {'on', f.at}, {}
    elseif f.t == 'off' then
      alone(between)
      later, between = {'off', f.at}, {}
    elseif f.e then   -- a PM by its at; a row of the per-recipient layout where its own id stands
      between[#between + 1] = {f.t or 'entry', f.at or row[1], f.e}
    end
    if #out >= need then
      break
    end
  end
  if #rows < page then
    break
  end
  top = '(' .. rows[#rows][1]
end
alone(between)
local n = #out
for i = 1, math.floor(n / 2) do
  out[i], out[n + 1 - i] = out[n + 1 - i], out[i]
end
return out
""")

HISTORY_FORWARD = Script("history_forward", "A piece of a user's history (read only), oldest first, from a "
                         "cursor: what the history script gives, read forwards in bounded steps.", _ROOM_LAST + """
-- KEYS[1] the user's hist key; ARGV prefix, then the cursor: h (XRANGE start of the next row of
-- the user's stream, '-' at first), mode ('1' in an online span), r (XRANGE start of the span's
-- next BM), hend and rend (the last ids of the user's stream and of the room log this read
-- stops at; '' at first: their ids now), skip (entries to count but not return); then want (entries
-- to return at most), work (rows to look at at most) and bytes (of entries to return, about).
-- Returns {cursor, lines, counted}: the cursor to go on from (its h '' when the read is over; its
-- ends are the read's), the lines, and how many entries were counted (returned or skipped).
local hist, room = KEYS[1], ARGV[1] .. 'room'
local h, mode, r, hend, rend = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local skip, want, work, bytes = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
if hend == '' then
  local last = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', 1)
  hend = last[1] and last[1][1] or '0-0'
  rend = room_last(ARGV[1])
end
local out, counted, size, progress = {}, 0, 0, false
local function take(line)
  progress = true
  counted = counted + 1
  if skip > 0 then
    skip = skip - 1
  else
    out[#out + 1] = line
    size = size + #line
  end
end
local function full()   -- each call takes one step at least, whatever its budget
  return progress and (work <= 0 or #out >= want or size >= bytes)
end
local function bms(bound)   -- the span's BMs up to bound (an id, inclusive): true once all are taken
  while not full() do
    local count = math.max(1, math.min(work, want - #out, 50))   -- 50 at a time: near the byte budget
    local rows = redis.call('XRANGE', room, r, bound, 'COUNT', count)
    for _, row in ipairs(rows) do
      take(row[2][2])
    end
    work = work - #rows - 1
    if #rows < count then
      r, progress = '(' .. bound, true
      return true
    end
    r = '(' .. rows[#rows][1]
  end
  return false
end
while not full() do
  local rows = redis.call('XRANGE', hist, h, hend, 'COUNT', math.max(1, math.min(work, 100)))
  work = work - 1
  if #rows == 0 then
    if mode ~= '1' or bms(rend) then
      h = ''
    end
    break
  end
  for _, row in ipairs(rows) do
    local f = {}
    for i = 1, #row[2], 2 do
      f[row[2][i]] = row[2][i + 1]
    end
    if mode == '1' and not bms(f.at or row[1]) then   -- (a row of the older layout: by its own id)
      break   -- this row comes again next time, after the rest of the BMs before it
    end
    if f.t == 'on' then
      mode, r = '1', '(' .. f.at
    elseif f.t == 'off' then
      mode = '0'
    elseif f.e then
      take(f.e)
    end
    h, progress = '(' .. row[1], true
    work = work - 1
    if full() then
      break
    end
  end
end
return {{h, mode, r, hend, rend, string.format('%.0f', skip)}, out, counted}
""")

MODERATE = Script("moderate", "Apply a moderation action to chat:mod, journal it in chat:modlog and XADD it "
                  "to chat:ev for every node.", """
-- KEYS[1] mod, KEYS[2] ev, KEYS[3] modlog; ARGV action, name, record (JSON), now (seconds),
-- ev maxlen, log maxlen.
-- Returns {1, event id}, or {0, ''} for an unban or unmute with nothing in force (nothing written).
local action, name, record, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if action == 'ban' or action == 'mute' then
  redis.call('HSET', KEYS[1], action .. ':' .. name, record)
elseif action == 'unban' or action == 'unmute' then
  local field = string.sub(action, 3) .. ':' .. name
  local old = redis.call('HGET', KEYS[1], field)
  if not old then
    return {0, ''}
  end
  redis.call('HDEL', KEYS[1], field)
  local ends = cjson.decode(old)['until']
  if type(ends) == 'number' and ends <= now then
    return {0, ''}
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'e', record)
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 't', 'mod', 'u', name, 'd', record)
return {1, id}
""")

SCRIPTS = (CREATE_ACCOUNT, BM, PM, LOGIN_SWAP, GO_ONLINE, LOGOUT, REGISTER_NODE, RENEW_LEASE, DEAD_NODES,
           REAP_NODE, HISTORY, HISTORY_FORWARD, MODERATE, PM_OFFLINE, LAST_KEY, TAKE_OFFLINE)


class ScriptCall(NamedTuple):
    """A script with its KEYS and ARGV: ``link.eval(callback, *call)``."""

    script: Script
    keys: Sequence
    args: Sequence


def _id_check(pm_id: PmId | None) -> list:
    """The id check's arguments of the PM scripts (an empty id: a PM1, nothing to check)."""
    window = f"{PM_CLOCK_WINDOW:.3f}"
    if pm_id is None:
        return ["", 0, 0, window, PM_IDS_PER_SENDER]
    return [pm_id.id, f"{pm_id.sent_at:.3f}", f"{pm_id.now:.3f}", window, PM_IDS_PER_SENDER]


class ChatKeys:
    """Key names under one prefix, and the call of each script with its keys and arguments."""

    def __init__(self, prefix: str = "chat:", room_maxlen: int = ROOM_MAXLEN, hist_maxlen: int = HIST_MAXLEN) -> None:
        self.prefix = prefix
        self.online = prefix + "online"
        self.nodes = prefix + "nodes"
        self.ev = prefix + "ev"
        self.room = prefix + "room"
        self.room_maxlen = room_maxlen
        self.hist_maxlen = hist_maxlen
        self.mod = prefix + "mod"
        self.modlog = prefix + "modlog"
        self.lastkey = prefix + "lastkey"

    def off(self, name: str) -> str:
        return f"{self.prefix}off:{name}"

    def acct(self, name: str) -> str:
        return f"{self.prefix}acct:{name}"

    def hist(self, name: str) -> str:
        return f"{self.prefix}hist:{name}"

    def sess(self, name: str) -> str:
        return f"{self.prefix}sess:{name}"

    def node(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def nodeusers(self, node: str) -> str:
        return f"{self.prefix}nodeusers:{node}"

    def inbox(self, node: str) -> str:
        return f"{self.prefix}in:{node}"

    def inpos(self, node: str) -> str:
        return f"{self.prefix}inpos:{node}"

    # --- script calls (names lower-cased by the caller) ---------------------------
    def create_account(self, name: str, fields: dict) -> ScriptCall:
        flat = [item for pair in fields.items() for item in pair]
        return ScriptCall(CREATE_ACCOUNT, [self.acct(name)], flat)

    def bm(self, sender: str, line: bytes | str, payload: bytes | str, sender_token: str = "",
           maxlen: int = EV_MAXLEN) -> ScriptCall:
        return ScriptCall(BM, [self.online, self.ev], [self.prefix, sender, line, payload, maxlen, sender_token,
                                                       self.room_maxlen])

    def pm(self, sender: str, target: str, token: str, sender_line: bytes | str, target_line: bytes | str,
           payload: bytes | str, sender_token: str = "", maxlen: int = INBOX_MAXLEN,
           pm_id: PmId | None = None) -> ScriptCall:
        return ScriptCall(PM, [self.sess(target)], [self.prefix, sender, target, token, sender_line,
                                                    target_line, payload, maxlen, sender_token,
                                                    self.hist_maxlen, *_id_check(pm_id)])

    def pm_offline(self, sender: str, target: str, sender_line: bytes | str, target_line: bytes | str,
                   payload: bytes | str, kept: bytes | str, limit: int, sender_token: str = "",
                   maxlen: int = INBOX_MAXLEN, pm_id: PmId | None = None, sender_limit: int = 0) -> ScriptCall:
        return ScriptCall(PM_OFFLINE, [self.online, self.off(target)],
                          [self.prefix, sender, target, sender_line, target_line, payload, kept, maxlen,
                           sender_token, self.hist_maxlen, limit, *_id_check(pm_id), sender_limit])

    def last_key(self, name: str) -> ScriptCall:
        return ScriptCall(LAST_KEY, [self.acct(name), self.lastkey], [name])

    def take_offline(self, name: str) -> ScriptCall:
        return ScriptCall(TAKE_OFFLINE, [self.off(name)], [])

    def login_swap(self, name: str, token: str, expected: str = "", ev_maxlen: int = EV_MAXLEN,
                   inbox_maxlen: int = INBOX_MAXLEN) -> ScriptCall:
        return ScriptCall(LOGIN_SWAP, [self.sess(name), self.online, self.ev],
                          [self.prefix, name, token, expected, ev_maxlen, inbox_maxlen, self.hist_maxlen])

    def go_online(self, name: str, token: str, record: bytes | str, maxlen: int = EV_MAXLEN,
                  recent: int = 0, since: str = "") -> ScriptCall:
        floor = ts_before(since, TS_ORDER_SLACK) if since else ""
        return ScriptCall(GO_ONLINE, [self.sess(name), self.online, self.ev],
                          [self.prefix, name, token, record, maxlen, self.hist_maxlen, recent, since, floor])

    def logout(self, name: str, token: str, maxlen: int = EV_MAXLEN) -> ScriptCall:
        return ScriptCall(LOGOUT, [self.sess(name), self.online, self.ev],
                          [self.prefix, name, token, maxlen, self.hist_maxlen])

    def register_node(self, node: str, lease_ms: int = LEASE_MS) -> ScriptCall:
        return ScriptCall(REGISTER_NODE, [self.node(node), self.nodes], [node, lease_ms])

    def renew_lease(self, node: str, lease_ms: int = LEASE_MS, read: str = "") -> ScriptCall:
        return ScriptCall(RENEW_LEASE, [self.node(node), self.inpos(node)], [node, lease_ms, read])

    def dead_nodes(self) -> ScriptCall:
        return ScriptCall(DEAD_NODES, [self.nodes], [self.prefix])

    def reap_node(self, node: str, maxlen: int = EV_MAXLEN, read: str = "",
                  inbox_maxlen: int = INBOX_MAXLEN) -> ScriptCall:
        return ScriptCall(REAP_NODE, [self.nodes, self.online, self.ev],
                          [self.prefix, node, maxlen, self.hist_maxlen, inbox_maxlen, read])

    def history(self, name: str, limit: int | None = None, page: int = HISTORY_PAGE) -> ScriptCall:
        return ScriptCall(HISTORY, [self.hist(name)], [self.prefix, limit or 0, page])

    def history_forward(self, name: str, cursor: Sequence = FORWARD_START, skip: int | None = None,
                        want: int = FORWARD_WANT, work: int = FORWARD_WORK,
                        size: int = FORWARD_BYTES) -> ScriptCall:
        """The next piece of a history read forwards; ``skip`` replaces the cursor's."""
        h, mode, r, hend, rend, kept_skip = cursor
        return ScriptCall(HISTORY_FORWARD, [self.hist(name)],
                          [self.prefix, h, mode, r, hend, rend, kept_skip if skip is None else skip, want, work,
                           size])

    def moderate(self, action: str, name: str, record: str, now: float, ev_maxlen: int = EV_MAXLEN,
                 log_maxlen: int = MODLOG_MAXLEN) -> ScriptCall:
        return ScriptCall(MODERATE, [self.mod, self.ev, self.modlog],
                          [action, name, record, repr(float(now)), ev_maxlen, log_maxlen])
