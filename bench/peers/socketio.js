'use strict';
// The reference peer of bench/run.py --peer socketio: a minimal chat server on
// Node socket.io 4 with @socket.io/redis-adapter, as people build one.
//
//   node bench/peers/socketio.js '{"port":N,"secret":"...","redis":"redis://...","prefix":"..."}'
//
// bench/run.py starts two of them (like imcluster's two gateways) on the same
// Redis; gen.js drives them with the same scenarios, in its socketio mode:
// PROTOCOL.md's frames travel as socket.io events named by their `type`
// (payload: the rest of the frame). It stores nothing (no database, no
// acknowledgement bookkeeping): the figures are what imcluster is compared to,
// not a second implementation of it.
//
// * connect: the HS256 JWT of the handshake's `auth.token` is checked in a
//   middleware (as `imcluster token` mints them); the socket joins the room
//   `u:<sub>` and gets `sync_done` {count: 0} (nothing is stored).
// * `message` {clientMsgId, sessionId, body}: a `message_send` {msgId,
//   sessionId, seq, from, ts, body} to the other user's room (`p2p:<a>:<b>`)
//   or to the group's room (other members; every node, through the adapter),
//   emitted with socket.io's acknowledgement (the recipients' clients ack it,
//   as imcluster's acknowledge with message_send_reply), then `message_reply`
//   {ok, clientMsgId, msgId, seq, ts} to the sender once every recipient
//   acked (or after 30 s). Without that the senders' closed loop is paced by
//   nothing: replying at once, a sender with 32 in flight outruns the
//   adapter's Redis pub/sub, whose subscriber Redis then disconnects at its
//   32 MB output limit (measured: 31k sent/s, 85 % lost, a node gone).
// * `session_create` {id, sessionId, members}: every socket of the members
//   (on every node) joins the room `g:<sessionId>`; `session_reply` once all
//   nodes have done it.
// * `message_send_reply`: taken and dropped (nothing to mark).
//
// Prints {"event":"listening","port":N} on stdout once it listens.

const http = require('http');
const crypto = require('crypto');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

const cfg = JSON.parse(process.argv[2]);
const node = crypto.randomBytes(3).toString('hex');
let seq = 0;

function verify(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  const sig = crypto.createHmac('sha256', cfg.secret).update(`${parts[0]}.${parts[1]}`).digest('base64url');
  if (sig.length !== parts[2].length || !crypto.timingSafeEqual(Buffer.from(sig), Buffer.from(parts[2]))) return null;
  let claims;
  try { claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString()); } catch (e) { return null; }
  if (typeof claims.sub !== 'string' || (claims.exp && claims.exp * 1000 < Date.now())) return null;
  return claims.sub;
}

(async () => {
  const pub = createClient({ url: cfg.redis });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pub, sub, { key: cfg.prefix }),
    transports: ['websocket'],
    serveClient: false,
  });

  io.use((socket, next) => {
    const user = verify(socket.handshake.auth && socket.handshake.auth.token);
    if (user === null) return next(new Error('invalid_token'));
    socket.data.user = user;
    next();
  });

  io.on('connection', (socket) => {
    const user = socket.data.user;
    socket.join(`u:${user}`);
    socket.emit('sync_done', { count: 0 });

    socket.on('message', (f) => {
      if (!f || typeof f.sessionId !== 'string') return;
      const ts = Date.now();
      const msgId = `${node}-${++seq}`;
      const out = { msgId, sessionId: f.sessionId, seq, from: user, ts, body: f.body };
      let sent;
      if (f.sessionId.startsWith('p2p:')) {
        const [, a, b] = f.sessionId.split(':');
        sent = io.timeout(30000).to(`u:${a === user ? b : a}`).emitWithAck('message_send', out);
      } else {
        // the group's other members, on every node
        sent = socket.timeout(30000).to(`g:${f.sessionId}`).emitWithAck('message_send', out);
      }
      const reply = () => socket.emit('message_reply', { ok: true, clientMsgId: f.clientMsgId, msgId, seq, ts });
      sent.then(reply, reply);
    });

    socket.on('session_create', async (f) => {
      const sessionId = f.sessionId || `g-${node}-${++seq}`;
      const members = [user, ...(f.members || []).filter((m) => m !== user)];
      const room = `g:${sessionId}`;
      io.in(members.map((m) => `u:${m}`)).socketsJoin(room);
      // the adapter answers a fetch after the join it published before: once
      // it returns, every node has put its sockets in the room
      const sockets = await io.in(room).fetchSockets();
      socket.emit('session_reply', { ok: true, id: f.id, sessionId, members: sockets.length });
    });

    // (acknowledgements come as socket.io acks of message_send; gen.js sends none of these here)
    socket.on('message_send_reply', () => {});
  });

  httpServer.listen(cfg.port, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({ event: 'listening', port: httpServer.address().port }) + '\n');
  });
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
})().catch((e) => {
  process.stderr.write(`socketio peer failed: ${e && e.stack || e}\n`);
  process.exit(1);
});
