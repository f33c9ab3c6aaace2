"""The shared history store: Redis (several server replicas, one store).

Keys per user ``U`` (``prefix`` default ``tfrec:h:``; ``{U}`` is a Redis Cluster
hash tag, so a user's keys live on one shard):

- ``prefix{U}:ev``: sorted set of events, score = timestamp, member =
  ``<arrival seq, 20 digits><TAB>item<TAB>timestamp<TAB>feedback<TAB>event id``:
  members of equal score sort by the arrival number (ties by arrival);
- ``prefix{U}:ids``: hash of the user's event ids (idempotency);
- ``prefix{U}:seq``: the user's arrival counter;
- stateful R2LED routes (``tfrec.history.routes``): ``prefix{U}:b:<level>:<prefix>``
  sorted sets (the bucket's ``bucket_size`` most recent members of ``:ev``, trimmed
  by rank in the append script), ``prefix{U}:bk`` the set of the user's bucket
  keys (what a delete removes), and the SID map beside the data:
  ``prefix routes`` (hash: fingerprint, routes = the JSON of ``SIDRoutes.meta``) and ``prefix
  routes:sids`` (hash item -> codes). The append script checks the fingerprint
  first and answers ``ROUTES_CHANGED`` (the client reloads the map and retries)
  when another process set new routes.

An append runs as one Lua script (Redis executes it atomically: no other command
runs in between, and the AOF/replicas receive its writes as one MULTI/EXEC), after
the whole batch was validated client-side. Durability once acknowledged is the
server's: run ``redis-server`` with ``--appendonly yes --appendfsync always``
(every write fsynced before the reply; ``everysec`` may lose the last second on
power loss, not on a killed process). Connection failures and timeouts
(``socket_timeout_seconds``) raise :class:`StoreUnavailable`.

Example (not run as a doctest: it needs a live ``redis-server``;
``tests/test_history_store.py`` starts one):
>>> store = RedisHistoryStore("redis://127.0.0.1:6379/0")  # doctest: +SKIP
>>> store.append([Event("u", "a", 1, 1.0, "e1")])           # doctest: +SKIP
1
"""

from __future__ import annotations

import json
import re
from typing import List

from tfrec.history.base import DEFAULT_MAX_READ, Event, HistoryStore, StoreUnavailable
from tfrec.history.routes import SIDRoutes

_APPEND = """
local prefix = ARGV[1]
local stored = redis.call('HGET', prefix .. 'routes', 'fingerprint') or ''
if stored ~= ARGV[2] then
  return redis.error_reply('ROUTES_CHANGED')
end
local size = tonumber(ARGV[3])
local added = 0
local i = 4
while i <= #ARGV do
  local base = prefix .. '{' .. ARGV[i] .. '}'
  local nkeys = tonumber(ARGV[i + 3])
  if redis.call('HSETNX', base .. ':ids', ARGV[i + 1], '1') == 1 then
    local seq = redis.call('INCR', base .. ':seq')
    local ts = string.match(ARGV[i + 2], '^[^\\t]*')
    local member = string.format('%020d', seq) .. '\\t' .. ARGV[i + 2]
    redis.call('ZADD', base .. ':ev', ts, member)
    for j = 1, nkeys do
      local bucket = base .. ':b:' .. ARGV[i + 3 + j]
      redis.call('ZADD', bucket, ts, member)
      redis.call('ZREMRANGEBYRANK', bucket, 0, -size - 1)
      redis.call('SADD', base .. ':bk', ARGV[i + 3 + j])
    end
    added = added + 1
  end
  i = i + 4 + nkeys
end
return added
"""

_DELETE = """
local base = ARGV[1]
local count = redis.call('ZCARD', base .. ':ev')
for _, key in ipairs(redis.call('SMEMBERS', base .. ':bk')) do
  redis.call('DEL', base .. ':b:' .. key)
end
redis.call('DEL', base .. ':ev', base .. ':ids', base .. ':seq', base .. ':bk')
return count
"""

_URL = re.compile(r"redis://(?P<host>[^:/]+)(?::(?P<port>[0-9]{1,5}))?(?:/(?P<db>[0-9]{1,2}))?")


def parse_redis_url(url: str):
    """``(host, port, db)`` of ``redis://host[:port][/db]``; ``ValueError`` naming the problem otherwise."""
    match = _URL.fullmatch(url or "")
    if not match:
        raise ValueError(f"bad Redis URL {url!r}: expected redis://host[:port][/db]")
    port = int(match["port"] or 6379)
    if not 1 <= port <= 65535:
        raise ValueError(f"bad Redis URL {url!r}: port must be in [1, 65535]")
    return match["host"], port, int(match["db"] or 0)


class RedisHistoryStore(HistoryStore):
    """:class:`HistoryStore` in Redis (see the module docstring).

    Args:
        url: ``redis://host[:port][/db]``.
        prefix: ``str``, key prefix, default ``"tfrec:h:"``.
        socket_timeout_seconds: ``float``, longest wait for a connection or an answer, default 5.
        max_read: ``int``, most events per read.
    """

    def __init__(self, url: str, prefix: str = "tfrec:h:", socket_timeout_seconds: float = 5.0,
                 max_read: int = DEFAULT_MAX_READ):
        import redis

        super().__init__(max_read)
        self.url, self.prefix = url, str(prefix)
        host, port, db = parse_redis_url(url)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._redis_error = redis.exceptions.RedisError
        self._client = redis.Redis(host=host, port=port, db=db, socket_timeout=socket_timeout_seconds,
                                   socket_connect_timeout=socket_timeout_seconds, decode_responses=False)
        self._append = self._client.register_script(_APPEND)
        self._delete_script = self._client.register_script(_DELETE)
        self._routes_loaded = False
        try:  # Redis may be down at start: then the routes load on first use (appends check them anyway)
            self._ensure_routes()
        except StoreUnavailable:
            pass

    def _ensure_routes(self) -> None:
        if not self._routes_loaded:
            self.routes = self._load_routes()
            self._routes_loaded = True

    def _load_routes(self):
        meta = self._run(lambda: self._client.hgetall(self.prefix + "routes"))
        if not meta:
            return None
        sids = self._run(lambda: self._client.hgetall(self.prefix + "routes:sids"))
        routes = SIDRoutes({k.decode("utf-8"): tuple(int(c) for c in v.split()) for k, v in sids.items()},
                           **json.loads(meta[b"routes"]))
        if routes.fingerprint != meta[b"fingerprint"].decode():
            raise StoreUnavailable(f"Redis history store at {self.url}: its SID routes do not match their "
                                   "fingerprint (set them again: tfrec events routes)")
        return routes

    def _key(self, user: str, suffix: str) -> str:
        return f"{self.prefix}{{{user}}}:{suffix}"

    def _run(self, call):
        try:
            return call()
        except self._errors as err:
            raise StoreUnavailable(f"Redis history store at {self.url} unreachable: {err}") from None
        except self._redis_error as err:
            raise StoreUnavailable(f"Redis history store at {self.url} failed: {err}") from None

    def _write(self, events: List[Event]) -> int:
        for _ in range(2):  # a second try after following routes another process set
            routes = self.routes
            args = [self.prefix, routes.fingerprint if routes else "", routes.bucket_size if routes else 0]
            for e, keys in self.bucket_keys(events):
                args += [e.user, e.event_id, f"{e.timestamp}\t{e.item}\t{e.feedback!r}\t{e.event_id}", len(keys),
                         *keys]
            try:
                return int(self._run(lambda: self._append(keys=[], args=args)))
            except StoreUnavailable as err:
                if "ROUTES_CHANGED" not in str(err):
                    raise
                self.routes, self._routes_loaded = self._load_routes(), True
        raise StoreUnavailable(f"Redis history store at {self.url}: its SID routes keep changing")

    @staticmethod
    def _event(user, member: bytes) -> Event:
        _, ts, item, feedback, event_id = member.decode("utf-8").split("\t")
        return Event(user, item, int(ts), float(feedback), event_id)

    def _refresh_routes(self) -> None:
        stored = self._run(lambda: self._client.hget(self.prefix + "routes", "fingerprint"))
        if (stored.decode() if stored else None) != (self.routes.fingerprint if self.routes else None):
            self.routes, self._routes_loaded = self._load_routes(), True

    def _read_routes(self, user: str, targets: List[str], recent: int) -> List[Event]:
        base = self._key(user, "b:")

        def read(keys):
            pipe = self._client.pipeline(transaction=True)  # one snapshot of the map, buckets and history
            pipe.hget(self.prefix + "routes", "fingerprint")
            for key in keys:
                pipe.zrange(base + key, 0, -1, withscores=True)
            pipe.zrange(self._key(user, "ev"), -recent, -1, withscores=True)
            return pipe.execute()

        for _ in range(2):  # a second try after following routes another process set
            if self.routes is None:
                raise ValueError("this history store has no SID routes any more (removed by another process)")
            routes = self.routes
            stored, *parts = self._run(lambda: read(routes.target_keys(targets)))
            if stored is not None and stored.decode() == routes.fingerprint:
                break
            self.routes, self._routes_loaded = self._load_routes(), True
        else:
            raise StoreUnavailable(f"Redis history store at {self.url}: its SID routes keep changing")
        members = {member: score for part in parts for member, score in part}
        ordered = sorted(members, key=lambda m: (members[m], m))  # timestamp, then the arrival number
        return [self._event(user, member) for member in ordered]

    def _set_routes(self, routes) -> int:
        import redis

        meta_key, sids_key = self.prefix + "routes", self.prefix + "routes:sids"

        def write_meta():
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(meta_key, sids_key)
            if routes is not None:
                items = list(routes.sids.items())
                for start in range(0, len(items), 10_000):
                    pipe.hset(sids_key, mapping={k: " ".join(map(str, v)) for k, v in items[start:start + 10_000]})
                pipe.hset(meta_key, mapping={"fingerprint": routes.fingerprint,
                                             "routes": json.dumps(routes.meta())})
            pipe.execute()

        self._run(write_meta)  # appenders with the old map now fail their check and reload this one
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "{*}:ev"
        users = 0
        for raw in self._run(lambda: list(self._client.scan_iter(match=pattern, count=1000))):
            user = raw.decode("utf-8")[len(self.prefix) + 1: -len("}:ev")]

            def rebuild(pipe, user=user):
                base = self._key(user, "")[:-1]
                members = pipe.zrange(base + ":ev", 0, -1)
                old = pipe.smembers(base + ":bk")
                pipe.multi()
                for key in old:
                    pipe.delete(base + ":b:" + key.decode("utf-8"))
                pipe.delete(base + ":bk")
                if routes is not None:
                    rows = [(m.split(b"\t", 3)[2].decode("utf-8"), m) for m in members]
                    for key, bucket in self.trimmed_buckets(rows, routes).items():
                        pipe.zadd(base + ":b:" + key, {m: int(m.split(b"\t", 2)[1]) for m in bucket})
                        pipe.sadd(base + ":bk", key)

            try:
                self._run(lambda: self._client.transaction(rebuild, self._key(user, "ev")))
            except redis.exceptions.WatchError:  # pragma: no cover - transaction() retries on its own
                raise StoreUnavailable(f"Redis history store at {self.url}: rebuild of {user!r} kept conflicting")
            users += 1
        return users

    def _read(self, user: str, n: int) -> List[Event]:
        members = self._run(lambda: self._client.zrange(self._key(user, "ev"), -n, -1))
        return [self._event(user, member) for member in members]

    def _read_items(self, user: str, n: int) -> List[str]:
        members = self._run(lambda: self._client.zrange(self._key(user, "ev"), -n, -1))
        return [member.split(b"\t", 3)[2].decode("utf-8") for member in members]

    def _delete(self, user: str) -> int:
        return int(self._run(lambda: self._delete_script(keys=[], args=[self._key(user, "")[:-1]])))

    def _count(self, user: str) -> int:
        return int(self._run(lambda: self._client.zcard(self._key(user, "ev"))))

    def close(self) -> None:
        self._client.close()
