"""The Celery app of hms-tasks: ``celery -A hms_tasks worker|beat|flower``.

Configuration has one source, Django settings: Celery options under the ``CELERY_`` namespace,
ours under ``HMS_TASKS_``. The safe defaults below apply unless the Django settings name the
option themselves, so a real HMS that points ``DJANGO_SETTINGS_MODULE`` at its own settings gets
them too. Start-up checks (:func:`startup_problems`) stop a worker or beat whose schedule or time
limits are inconsistent, with an error naming the entry or setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import redis
from celery import Celery, bootsteps
from celery.utils.log import get_logger
from kombu import Queue
from redbeat import RedBeatScheduler  # type: ignore[import-untyped]
from redbeat.schedulers import acquire_distributed_beat_lock  # type: ignore[import-untyped]

from hms_tasks import broker, capabilities, conf, flower, names, schedule, store, tls
from hms_tasks.errors import ConfigurationError

__all__ = [
    "STARTUP_CHECKS",
    "app",
    "beat_lag",
    "celery_defaults",
    "load_tasks",
    "longest_retry_wait",
    "max_countdown",
    "route",
    "run_startup_checks",
    "sentinel_options",
    "startup_problems",
]

conf.default_settings_module()

#: Task modules of the capabilities; the app imports them when it starts.
TASK_MODULES = capabilities.module_names("tasks")

# A task's hard time limit when it declares none; capabilities declare their own.
DEFAULT_TIME_LIMIT = 300

#: Extra start-up checks capabilities register from their task modules (each returns problems,
#: one line each), so the core runs them without knowing the capabilities.
STARTUP_CHECKS: list[Callable[[], list[str]]] = []

#: Seconds between kombu's sweeps for unacknowledged messages older than the visibility
#: timeout (a worker died holding them). kombu's defaults (10 s, but a real sweep only every
#: 10th time) add up to 100 s to every redelivery; with these, a message whose worker was
#: SIGKILLed is back on its queue within the visibility timeout plus 10 s.
RESTORE_INTERVAL = 10

#: Seconds a countdown or ETA must leave below the visibility timeout besides the task's own
#: hard time limit: the ack's round trip, and clock skew between the publisher (which turns a
#: countdown into an absolute ETA) and the workers.
COUNTDOWN_MARGIN = 10

#: Beat wakes at least this often (seconds): the standby beats' lock poll and the holder's
#: lock extension. Celery's default of 300 s would let a takeover take over five minutes.
BEAT_MAX_LOOP_INTERVAL = 5
#: Seconds the beat lock lives without an extension: six of the holder's ticks, so a holder
#: slowed by a Redis blip or a long publish keeps it, while a holder that was killed is
#: replaced within BEAT_LOCK_TIMEOUT + BEAT_MAX_LOOP_INTERVAL (35 s): at most one missed
#: health sweep (every 30 s), and nothing else in the schedule runs more often than a minute.
BEAT_LOCK_TIMEOUT = 30

logger = get_logger(__name__)


def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Celery router: ``hms.<capability>.*`` tasks go to the ``hms.<capability>`` queue."""
    return {"queue": names.queue_for(name)}


def celery_defaults() -> dict[str, Any]:
    """Celery options hms-tasks sets unless Django settings override them (``CELERY_<NAME>``)."""
    from django.conf import settings

    hms = conf.get()
    redis_url = os.environ.get("REDIS_URL") or conf.DEFAULT_REDIS_URL
    transport = {
        "visibility_timeout": hms.visibility_timeout,
        # A dead TCP connection must not hang a worker forever.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 25,
    }
    broker_transport = {
        **transport,
        "unacked_restore_interval": RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,  # a sweep every interval, not every 10th
    }
    options = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        # JSON only: pickle from a reachable Redis is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "broker_transport_options": broker_transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Prefetched messages are unacked too, and age toward the visibility timeout.
        "worker_prefetch_multiplier": 1,
        # And a message must not wait in a worker behind a long task either (a load-test
        # shard acks at its start, which frees its prefetch slot): a worker takes a message
        # only when a pool process is free for it, so an unacked message is a running one.
        "worker_disable_prefetch": True,
        # Otherwise late-ack tasks can run twice after a connection loss (celery#4671).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Malformed messages are dead-lettered, not crash the worker (hms_tasks.worker_guard).
        "worker_consumer": "hms_tasks.worker_guard:Consumer",
        "task_time_limit": DEFAULT_TIME_LIMIT,
        "task_soft_time_limit": DEFAULT_TIME_LIMIT - 30,
        "task_acks_on_failure_or_timeout": True,
        # Results are small summaries that Flower and `dispatch --wait` read soon after.
        "result_expires": 3600,
        "result_extended": False,  # it would store args next to results
        "task_track_started": True,
        "worker_send_task_events": True,  # Flower
        "task_send_sent_event": True,
        "task_default_queue": names.DEFAULT_QUEUE,
        "task_queues": [Queue(q, routing_key=q) for q in names.ALL_QUEUES],
        "task_routes": (route,),
        "beat_schedule": schedule.load(hms.beat_schedule),
        "beat_scheduler": "hms_tasks.celery:CheckedScheduler",
        # Any number of beats may run: one holds redbeat's lock and publishes, the others wait.
        "beat_max_loop_interval": BEAT_MAX_LOOP_INTERVAL,
        "redbeat_redis_url": hms.redis_url,
        # <prefix>:redbeat::schedule, <prefix>:redbeat::lock, <prefix>:redbeat:<entry key>
        "redbeat_key_prefix": store.key("redbeat") + ":",
        "redbeat_lock_timeout": BEAT_LOCK_TIMEOUT,
        # The options of every hms-tasks Redis client (hms_tasks.store), and no retry proxy:
        # CheckedScheduler.tick rides out connection errors itself.
        "redbeat_redis_options": {
            "socket_timeout": store.SOCKET_TIMEOUT,
            "socket_connect_timeout": store.CONNECT_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": store.HEALTH_CHECK_INTERVAL,
        },
        "timezone": settings.TIME_ZONE,
        "enable_utc": True,
        # Every node also consumes its own queue (<node>.dq2): metric samples and memory
        # sweeps are published to each live node by name.
        "worker_direct": True,
    }
    # What capabilities need of Celery (their settings module's celery_options()).
    if hms.redis_sentinels:
        options.update(sentinel_options(options))
    for module in capabilities.modules("settings"):
        contribute = getattr(module, "celery_options", None)
        if contribute is not None:
            options.update(contribute())
    return options


def sentinel_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """With ``HMS_TASKS_REDIS_SENTINELS``: broker (kombu's Sentinel transport, guarded), result
    backend (Celery's ``sentinel://``) and redbeat ask the sentinels for the master named
    ``HMS_TASKS_REDIS_SENTINEL_MASTER``, with TLS, credentials and database from
    ``HMS_TASKS_REDIS_URL``; ``options`` are the non-Sentinel defaults they extend."""
    hms = conf.get()
    url = urlsplit(hms.redis_url)
    auth = ""
    if url.password is not None:
        auth = f"{quote(unquote(url.username or ''), safe='')}:" \
               f"{quote(unquote(url.password), safe='')}@"
    db = url.path.strip("/") or "0"
    sentinel_url = ";".join(f"sentinel://{auth}{entry}/{db}" for entry in hms.redis_sentinels)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": store.SOCKET_TIMEOUT,
                                       "socket_connect_timeout": store.CONNECT_TIMEOUT}
    if hms.redis_sentinel_username:
        sentinel_kwargs["username"] = hms.redis_sentinel_username
    if hms.redis_sentinel_password:
        sentinel_kwargs["password"] = hms.redis_sentinel_password
    _, ssl_options = tls.celery_ssl(hms.redis_url)
    if hms.redis_sentinel_tls:
        sentinel_kwargs.update(ssl=True, **(ssl_options or {}))
    master = {"master_name": hms.redis_sentinel_master, "sentinel_kwargs": sentinel_kwargs}
    out: dict[str, Any] = {
        # A publish during a failover retries until the sentinels name the new master (a
        # SIGKILLed master takes down-after-milliseconds plus an election: seconds), up to
        # about 30 s, and while the new master refuses writes for want of a replica, up to
        # about 5 s (broker.pause_on_noreplicas); the cache's fan-out dispatch does not wait
        # (its own retries). kombu's ensure() takes the errback from the policy.
        "task_publish_retry_policy": {"max_retries": 20, "interval_start": 0,
                                      "interval_step": 0.5, "interval_max": 2,
                                      "errback": broker.pause_on_noreplicas},
        "broker_url": sentinel_url,
        # kombu would switch to kombu's own transport on a connection error (keep_sentinels).
        "broker_failover_strategy": broker.keep_sentinels,
        "result_backend": f"{broker.SENTINEL_BACKEND}+{sentinel_url}",
        # A result written in the switch waits for the new master rather than fail the task.
        "result_backend_always_retry": True,
        # ... with pauses of at most 1 s (Celery's default: 10 s, with full jitter). The
        # worker's main process writes some results itself (a task it terminates on a
        # connection loss) and consumes nothing while it sleeps: in the failover benchmark
        # one such write held the consumer 11 s after its master was back.
        "result_backend_max_sleep_between_retries_ms": 1000,
        "broker_transport_options": {**options["broker_transport_options"], **master},
        "result_backend_transport_options": {
            **options["result_backend_transport_options"], **master},
        # redbeat's own Sentinel client (redis-sentinel:// selects it).
        "redbeat_redis_url": "redis-sentinel://",
        "redbeat_redis_options": {
            **options["redbeat_redis_options"],
            "sentinels": [(h.strip("[]"), int(p)) for h, _, p in
                          (e.rpartition(":") for e in hms.redis_sentinels)],
            "service_name": hms.redis_sentinel_master,
            "db": int(db),
            "password": unquote(url.password) if url.password is not None else None,
            "sentinel_kwargs": sentinel_kwargs,
            **({"username": unquote(url.username)} if url.username else {}),
        },
    }
    if ssl_options is not None:
        out.update(broker_use_ssl=ssl_options, redis_backend_use_ssl=ssl_options,
                   redbeat_redis_use_ssl=ssl_options)
    return out


class _DjangoCeleryConfig(Mapping[str, Any]):
    """Celery's configuration source: our defaults under Django's ``CELERY_*`` settings.

    Built on first access (Celery reads configuration lazily), so importing the app never
    imports Django settings. Keys are handed to Celery in its lower-case names
    (``CELERY_TASK_SERIALIZER`` becomes ``task_serializer``): given upper-case names through
    a namespace, Celery 5 takes them for its 3.x names and warns that each is deprecated.
    """

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            from django.conf import settings

            data = celery_defaults()
            data.update({
                k.removeprefix("CELERY_").lower(): getattr(settings, k)
                for k in dir(settings) if k.startswith("CELERY_")
            })
            # The guarded Redis transport (hms_tasks.broker), unless the settings name one.
            data.setdefault("broker_transport", broker.transport_for(data["broker_url"]))
            # rediss://: broker and backend verify the server alike, from the URL's ssl_*
            # query (kombu alone would not verify at all), unless the settings say otherwise.
            for url_option, ssl_option in (("broker_url", "broker_use_ssl"),
                                           ("result_backend", "redis_backend_use_ssl")):
                if isinstance(data.get(url_option), str) and ssl_option not in data:
                    url, options = tls.celery_ssl(data[url_option])
                    if options is not None:
                        data[url_option], data[ssl_option] = url, options
            self._data = data
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def max_countdown(name: str, *, time_limit: float | None = None,
                  celery_app: Celery | None = None) -> float:
    """The longest countdown (or ETA from now) the hms task ``name`` may be published with.

    A worker takes an ETA message off the queue at once and holds it unacknowledged until the
    task has run (an acks_late task) or started: it must be acknowledged within the visibility
    timeout of its delivery, or a live worker's restore sweep hands it out again, over and over
    (kombu#337). So: countdown + hard time limit (acks_late tasks) + ``COUNTDOWN_MARGIN`` <=
    visibility timeout. ``time_limit`` is a per-message override of the task's. A task this
    process has not imported yet is looked up after importing the task modules (as a worker
    does at start); one that is nowhere counts with the default hard time limit.
    """
    celery_app = celery_app or app
    c = celery_app.conf
    if name not in celery_app.tasks:
        load_tasks(celery_app)
    task = celery_app.tasks.get(name)
    limit = 0.0
    if task is None or task.acks_late:
        limit = float(time_limit or (task.time_limit if task else None)
                      or c.task_time_limit or 0)
    return conf.get().visibility_timeout - COUNTDOWN_MARGIN - limit


def longest_retry_wait(task: Any) -> float:
    """The longest countdown Celery's ``autoretry_for`` gives a retry of ``task`` (seconds):
    the last exponential backoff step (capped at ``retry_backoff_max``; jitter only shortens
    it), or ``default_retry_delay`` without backoff; 0 for a task that is never retried."""
    # Celery sets these attributes only on tasks that declare them; its defaults otherwise.
    backoff = getattr(task, "retry_backoff", False)
    backoff_max = getattr(task, "retry_backoff_max", 600)
    if not getattr(task, "autoretry_for", ()) or task.max_retries == 0:
        return 0.0
    if not backoff:
        return float(task.default_retry_delay)
    factor = int(max(1.0, float(backoff)))
    if task.max_retries is None:
        return float(backoff_max)
    return float(min(backoff_max, factor * 2 ** (task.max_retries - 1)))


class HmsCelery(Celery):
    """Celery, refusing to publish an hms task whose countdown or ETA is longer than
    :func:`max_countdown` (every publish goes through ``send_task``: ``delay``,
    ``apply_async``, retries, groups). Such a message would be redelivered while it waits,
    again and again; a task that must wait longer re-sends itself, as the load-test merge and
    the memory snapshot do."""

    def send_task(  # type: ignore[override]
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        countdown: float | None = None,
        eta: datetime | str | None = None,
        **options: Any,
    ) -> Any:
        wait = float(countdown or 0)
        if not countdown and eta:
            when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
            if when.tzinfo is None:
                when = when.replace(tzinfo=self.timezone)
            wait = (when - self.now()).total_seconds()
        if wait > 0 and name.startswith("hms."):
            cap = max_countdown(name, time_limit=options.get("time_limit"), celery_app=self)
            if wait > cap:
                raise ConfigurationError(
                    f"task {name}: a countdown or ETA may be at most {max(cap, 0):g} s away:"
                    f" the visibility timeout ({conf.get().visibility_timeout} s,"
                    " HMS_TASKS_VISIBILITY_TIMEOUT) less the task's hard time limit and a"
                    f" {COUNTDOWN_MARGIN} s margin; a longer wait is redelivered while it"
                    " waits. Nothing was sent")
        # Celery takes an ISO string as well as a datetime (its stubs say datetime only).
        return super().send_task(name, args, kwargs, countdown, cast(Any, eta), **options)


app = HmsCelery("hms_tasks", include=TASK_MODULES)
app.config_from_object(_DjangoCeleryConfig())


def load_tasks(celery_app: Celery) -> None:
    """Import every task module the app names (``include`` and ``imports``), registering tasks.

    Unlike ``loader.import_default_modules`` this skips Django's system checks, which the
    worker runs anyway, so the CLI and beat stay quick to start.
    """
    for module in celery_app.loader.default_modules:
        celery_app.loader.import_task_module(module)


def startup_problems(celery_app: Celery) -> list[str]:
    """Everything wrong with the configuration that must stop a worker or beat, one line each."""
    load_tasks(celery_app)
    c = celery_app.conf
    problems: list[str] = []
    for option in ("accept_content", "result_accept_content"):
        if set(c[option] or ()) - {"json", "application/json"}:
            problems.append(f"CELERY_{option.upper()} must accept JSON only (pickle is refused)")
    capabilities.modules("settings")  # importing a settings module registers its section
    problems += conf.check_all()
    problems += schedule.unregistered(c.beat_schedule or {}, set(celery_app.tasks))
    vt = conf.get().visibility_timeout
    for option in ("broker_transport_options", "result_backend_transport_options"):
        given = (c[option] or {}).get("visibility_timeout")
        if given != vt:
            problems.append(
                f"CELERY_{option.upper()}['visibility_timeout'] is {given}, but"
                f" HMS_TASKS_VISIBILITY_TIMEOUT is {vt}: set them alike"
            )
    problems += tls.problems(c)
    for check in STARTUP_CHECKS:
        problems += check()
    default_limit = c.task_time_limit
    for name, task in sorted(celery_app.tasks.items()):
        # A task acked early (at its start) is never redelivered while it runs; an acks_late
        # one is, once it has run for the visibility timeout.
        if name.startswith("celery.") or not task.acks_late:
            continue
        limit = task.time_limit or default_limit
        if limit is None or limit >= vt:
            problems.append(
                f"task {name}: hard time limit {limit} s must be below the visibility timeout"
                f" ({vt} s, HMS_TASKS_VISIBILITY_TIMEOUT), or a running task is redelivered"
            )
        elif name.startswith("hms.") and longest_retry_wait(task) > max_countdown(
                name, celery_app=celery_app):
            problems.append(
                f"task {name}: its retries wait up to {longest_retry_wait(task):g} s, longer"
                " than its hard time limit leaves below the visibility timeout"
                f" ({vt} s, HMS_TASKS_VISIBILITY_TIMEOUT): lower retry_backoff_max"
            )
    return problems


def run_startup_checks(celery_app: Celery) -> None:
    """Raise :class:`ConfigurationError` listing every start-up problem."""
    problems = startup_problems(celery_app)
    if problems:
        raise ConfigurationError("hms-tasks start-up checks failed:\n  " + "\n  ".join(problems))


class StartupChecks(bootsteps.Step):
    """Worker boot step: refuse to start on a bad schedule or time limits."""

    name = "hms_tasks.StartupChecks"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        run_startup_checks(parent.app)
        super().__init__(parent, **kwargs)


class CheckedScheduler(RedBeatScheduler):  # type: ignore[misc]
    """celery-redbeat's scheduler, after the same start-up checks as the worker.

    The schedule lives in Redis under ``<prefix>:redbeat:``; every beat loads
    ``HMS_TASKS_BEAT_SCHEDULE`` into it at start (entries no longer there are deleted, and an
    entry's last run is kept). Only the beat that holds the lock ``<prefix>:redbeat::lock``
    publishes; the others poll for it every ``BEAT_MAX_LOOP_INTERVAL`` seconds. A slot is
    recorded as run before its message is sent, so a holder killed in between loses that
    slot rather than have its successor send it again.
    """

    def setup_schedule(self) -> None:
        run_startup_checks(self.app)
        super().setup_schedule()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        # redbeat extends its lock through a plain client at every tick: a Redis blip would
        # end beat (and with it `hms-tasks run`). Nothing is sent in a tick whose lock
        # extension failed; the next one extends again.
        try:
            if self.lock_key and self.lock is None:
                # redbeat acquires the lock in a beat_init handler, blocking while another
                # beat holds it; Celery swallows an exception raised there, so a Redis outage
                # while this beat waited as a standby left it without a lock, and redbeat's
                # tick ended beat with AttributeError (None.extend). Acquire it here instead,
                # the same way, retried after an interval while Redis is unreachable.
                acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=self))
            return float(super().tick(*args, **kwargs))
        except redis.exceptions.LockNotOwnedError:
            # The lock is gone: it expired while Redis was away, or a failover lost it (the
            # promoted replica never had its key or its last extensions). Another beat may
            # hold it by now, so this one sends nothing more until it holds it again: at the
            # next tick it waits for it as a standby does. (redbeat ended beat here, and a
            # failover ended the one beat of a site until something restarted it.)
            logger.warning("beat: lost the lock %s; waiting for it as a standby",
                           self.lock_key)
            this: Any = self  # redbeat's scheduler, untyped
            this.lock = None
            return float(BEAT_MAX_LOOP_INTERVAL)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("beat: Redis unreachable (%s); retrying in %d s",
                           type(exc).__name__, BEAT_MAX_LOOP_INTERVAL)
            return float(BEAT_MAX_LOOP_INTERVAL)
        except redis.ResponseError as exc:
            # A master just promoted by Sentinel refuses writes until it has a replica
            # (min-replicas-to-write): a blip like the one above (redbeat's own client).
            if not str(exc).startswith("NOREPLICAS"):
                raise
            logger.warning("beat: the Redis master has no replica yet; retrying in %d s",
                           BEAT_MAX_LOOP_INTERVAL)
            return float(BEAT_MAX_LOOP_INTERVAL)


def beat_lag(celery_app: Celery | None = None) -> float:
    """Seconds by which the most overdue entry of the beat schedule in Redis is late (0 when
    none is): above a few loop intervals, no beat holds the lock and publishes. A health check
    of the beat deployment as a whole (a standby beat is healthy while it waits)."""
    import time

    c = (celery_app or app).conf
    # With sentinels redbeat's URL names no server: the store's client finds the master.
    sentinel = str(c.redbeat_redis_url).startswith("redis-sentinel")
    client = store.client(url=None if sentinel else c.redbeat_redis_url)
    now = time.time()
    # Scores are due instants; redbeat gives disabled entries -1 (hence from 0).
    due: list[tuple[str, float]] = client.zrange(  # type: ignore[assignment]
        c.redbeat_key_prefix + ":schedule", 0, now, byscore=True, withscores=True)
    return max((now - float(score) for _, score in due), default=0.0)


app.steps["worker"].add(StartupChecks)
# `celery -A hms_tasks flower`: auth off loopback, read-only by default (hms_tasks.flower).
flower.connect(app)
