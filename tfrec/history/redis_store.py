"""The shared history store: Redis (several server replicas, one store).

Keys per user ``U`` (``prefix`` default ``tfrec:h:``; ``{U}`` is a Redis Cluster
hash tag, so a user's keys live on one shard):

- ``prefix{U}:ev``: sorted set of events, score = timestamp, member =
  ``<arrival seq, 20 digits><TAB>item<TAB>timestamp<TAB>feedback<TAB>event id``:
  members of equal score sort by the arrival number (ties by arrival);
- ``prefix{U}:ids``: hash of the user's event ids (idempotency);
- ``prefix{U}:seq``: the user's arrival counter.

An append runs as one Lua script (Redis executes it atomically: no other command
runs in between, and the AOF/replicas receive its writes as one MULTI/EXEC), after
the whole batch was validated client-side. Durability once acknowledged is the
server's: run ``redis-server`` with ``--appendonly yes --appendfsync always``
(every write fsynced before the reply; ``everysec`` may lose the last second on
power loss, not on a killed process). Connection failures and timeouts
(``socket_timeout_seconds``) raise :class:`StoreUnavailable`.

Example (needs a running server):
>>> store = RedisHistoryStore("redis://127.0.0.1:6379/0")  # doctest: +SKIP
>>> store.append([Event("u", "a", 1, 1.0, "e1")])           # doctest: +SKIP
1
"""

from __future__ import annotations

import re
from typing import List

from tfrec.history.base import DEFAULT_MAX_READ, Event, HistoryStore, StoreUnavailable

_APPEND = """
local prefix = ARGV[1]
local added = 0
for i = 2, #ARGV, 3 do
  local base = prefix .. '{' .. ARGV[i] .. '}'
  if redis.call('HSETNX', base .. ':ids', ARGV[i + 1], '1') == 1 then
    local seq = redis.call('INCR', base .. ':seq')
    local ts = string.match(ARGV[i + 2], '^[^\\t]*')
    redis.call('ZADD', base .. ':ev', ts, string.format('%020d', seq) .. '\\t' .. ARGV[i + 2])
    added = added + 1
  end
end
return added
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
        args = [self.prefix]
        for e in events:
            args += [e.user, e.event_id, f"{e.timestamp}\t{e.item}\t{e.feedback!r}\t{e.event_id}"]
        return int(self._run(lambda: self._append(keys=[], args=args)))

    def _read(self, user: str, n: int) -> List[Event]:
        members = self._run(lambda: self._client.zrange(self._key(user, "ev"), -n, -1))
        events = []
        for member in members:
            _, ts, item, feedback, event_id = member.decode("utf-8").split("\t")
            events.append(Event(user, item, int(ts), float(feedback), event_id))
        return events

    def _read_items(self, user: str, n: int) -> List[str]:
        members = self._run(lambda: self._client.zrange(self._key(user, "ev"), -n, -1))
        return [member.split(b"\t", 3)[2].decode("utf-8") for member in members]

    def _delete(self, user: str) -> int:
        def delete():
            pipe = self._client.pipeline(transaction=True)
            pipe.zcard(self._key(user, "ev"))
            pipe.delete(self._key(user, "ev"), self._key(user, "ids"), self._key(user, "seq"))
            return pipe.execute()[0]

        return int(self._run(delete))

    def _count(self, user: str) -> int:
        return int(self._run(lambda: self._client.zcard(self._key(user, "ev"))))

    def close(self) -> None:
        self._client.close()
