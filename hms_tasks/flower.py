"""Flower against hms_tasks: auth off loopback, read-only by default, metrics behind auth.

``celery -A hms_tasks flower ...`` runs these guards as Flower builds its application, before it
binds a port:

- **Off loopback, auth is required.** On any address that is not loopback (Flower's default
  address, empty, means every interface), Flower must have basic auth (``FLOWER_BASIC_AUTH`` or
  ``--basic_auth``, each entry ``user:password``) or OAuth (``FLOWER_AUTH``/``--auth``);
  otherwise it exits with status 2 and a message naming ``FLOWER_BASIC_AUTH``. A Unix socket
  (``--unix_socket``) counts as local.
- **Read-only unless ``HMS_TASKS_FLOWER_CONTROL = True``.** Every API endpoint that changes
  the cluster (worker shutdown, pool restart/grow/shrink/autoscale, queue add/cancel consumer,
  task revoke/abort, rate and time limits, and any state-changing endpoint a later Flower adds)
  answers 403. Running tasks stays allowed (``/api/task/apply``, ``async-apply``,
  ``send-task``): it is how tasks are run "from Flower", and our workers validate every
  argument (``celery call`` could send the same message).
- **``/metrics`` needs the same auth as the pages** (Flower serves it to anyone);
  ``/healthcheck`` stays open for probes (it says ``OK`` and nothing else).
- **No cross-site requests.** Requests a browser marks as coming from another site
  (``Sec-Fetch-Site``, or an ``Origin`` that is not Flower's host) are refused, except a
  followed link (a top-level GET navigation). With ``FLOWER_UNAUTHENTICATED_API`` (the demo
  stack on loopback) Flower answers with CORS ``*``, so any page open in a local browser could
  otherwise read task arguments and results and run tasks through it.

How it hooks in: Celery's ``import_modules`` signal, which Flower's application sends from its
constructor (``capp.loader.import_default_modules()``), after Flower has read its options
(command line, ``FLOWER_*`` variables, ``--conf`` file) and before it binds. The routes are
changed with Tornado's public ``Application.add_handlers``, whose rules take precedence over the
ones the application was built with; the handlers are subclasses of Flower's own.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import socket
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

import click

from hms_tasks import conf
from hms_tasks.errors import ConfigurationError

__all__ = ["FlowerSettings", "connect", "install", "start_problems"]

#: The POST endpoints read-only mode keeps: they run tasks, which workers validate.
RUN_TASK_ENDPOINTS = ("/api/task/apply/", "/api/task/async-apply/", "/api/task/send-task/")

_CHANGING_METHODS = ("post", "put", "patch", "delete")


class FlowerSettings(conf.Settings):
    """``HMS_TASKS_FLOWER_CONTROL``: allow Flower's control endpoints (default: read-only)."""

    flower_control: bool = False


get = conf.section(FlowerSettings)


def _is_loopback_address(address: str) -> bool:
    """Whether ``address`` (what Flower binds: an IP, a host name, or '' for all) is loopback.

    A name counts only if every address it resolves to is loopback, as Tornado binds them all.
    """
    host = address.strip().strip("[]")
    if not host:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def start_problems(options: Any) -> list[str]:
    """What must stop Flower from starting with these (Tornado) options, one line each."""
    problems: list[str] = []
    basic = [c for c in (options.basic_auth or []) if c]
    for index, credential in enumerate(basic):
        user, sep, password = credential.partition(":")
        if not (sep and user and password):
            # The entry itself is a secret: name it by position only.
            problems.append(
                f"FLOWER_BASIC_AUTH entry {index + 1} must be user:password (both non-empty)"
            )
    local = bool(options.unix_socket) or _is_loopback_address(options.address or "")
    if not local and not basic and not options.auth:
        where = repr(options.address) if options.address else "every interface"
        problems.append(
            f"Flower would listen on {where}, which is not loopback, without authentication:"
            " set FLOWER_BASIC_AUTH=user:password (or OAuth with FLOWER_AUTH and a"
            " FLOWER_AUTH_PROVIDER), or bind it to --address=127.0.0.1"
        )
    return problems


def _route(handler: Any) -> tuple[str, Any, dict[str, Any]]:
    """(regex, handler class, kwargs) of one entry of Flower's route table."""
    if isinstance(handler, tuple):
        return handler[0], handler[1], (handler[2] if len(handler) > 2 else {})
    return handler.regex.pattern, handler.handler_class, handler.kwargs


def _changing_methods(handler_class: Any) -> list[str]:
    """The state-changing HTTP methods a handler implements (RequestHandler's answer 405)."""
    from tornado.web import RequestHandler

    return [m for m in _CHANGING_METHODS
            if getattr(handler_class, m) is not getattr(RequestHandler, m)]


def _routes(control: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """Flower's routes again, each behind the same-site check; in read-only mode the
    state-changing ``/api/`` ones refused; ``/metrics`` behind auth."""
    from flower import urls
    from flower.views.error import NotFoundErrorHandler
    from flower.views.monitor import Metrics
    from tornado import web

    class SameSiteOnly:
        """Refuses what a browser sent from another site (CSRF, and reads through CORS ``*``),
        except following a link (a top-level GET navigation, as an OAuth callback is)."""

        request: Any

        def prepare(self) -> None:
            super().prepare()  # type: ignore[misc]  # Flower's: the unauthenticated-API rule
            headers = self.request.headers
            site, origin = headers.get("Sec-Fetch-Site"), headers.get("Origin")
            followed_link = headers.get("Sec-Fetch-Mode") == "navigate" and (
                self.request.method == "GET")
            if site and site not in ("same-origin", "none") and not followed_link:
                raise web.HTTPError(403, "cross-site requests are refused")
            if not site and origin and urlparse(origin).netloc != self.request.host:
                raise web.HTTPError(403, "cross-origin requests are refused")

    class AuthenticatedMetrics(Metrics):  # type: ignore[misc]
        @web.authenticated
        async def get(self) -> None:
            await super().get()

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise web.HTTPError(
            403, "Flower is read-only under hms-tasks: set HMS_TASKS_FLOWER_CONTROL = True"
                 " in the Django settings to allow control endpoints"
        )

    out: list[tuple[str, Any, dict[str, Any]]] = []
    for entry in urls.handlers:
        pattern, handler_class, kwargs = _route(entry)
        if issubclass(handler_class, web.StaticFileHandler | NotFoundErrorHandler):
            # Flower's CSS and scripts, and its catch-all 404: ours would shadow Tornado's
            # own static routes (favicon.ico) that come after it.
            continue
        if handler_class is Metrics:
            handler_class = AuthenticatedMetrics
        attrs: dict[str, Any] = {}
        if not control and pattern.startswith("/api/") and not pattern.startswith(
            RUN_TASK_ENDPOINTS
        ):
            # Authenticated first, so an anonymous caller learns nothing more than a 401.
            attrs = {m: web.authenticated(refuse) for m in _changing_methods(handler_class)}
        name = f"HmsTasks{handler_class.__name__}"
        out.append((pattern, type(name, (SameSiteOnly, handler_class), attrs), kwargs))
    return out


def install(flower_app: Any, *, control: bool) -> list[tuple[str, Any, dict[str, Any]]]:
    """Lay hms-tasks' routes over a Flower application (before it serves); returns them."""
    routes = _routes(control)
    prefix = (flower_app.options.url_prefix or "").strip("/")
    if prefix:  # as Flower itself prefixes its routes (flower.app.rewrite_handler)
        routes = [(f"/{prefix}{pattern}", cls, kw) for pattern, cls, kw in routes]
    # add_handlers inserts before the rules the application was built with: ours win.
    flower_app.add_handlers(r".*", routes)
    return routes


def _flower_being_built() -> Any:
    """The Flower application whose constructor sent this signal, if any.

    Why a look up the call stack: Flower offers no hook that receives its application object.
    Tried first: Flower's ``--conf`` file (runs only if the operator passes it or it sits in
    the working directory, so it guards nothing), ``app.user_options['flower']`` (runs before
    Flower has read its options, and sees no application either), Tornado settings and output
    transforms (no say in routing or before a handler runs), and wrapping ``flower.urls`` or
    the ``flower`` command (monkey-patching). The signal is sent by ``Flower.__init__``, so the
    application is ``self`` a few frames up; if a later Flower builds it elsewhere this finds
    nothing and :func:`_on_import_modules` refuses to start rather than run unguarded.
    """
    flower_module = sys.modules.get("flower.app")
    if flower_module is None:
        return None
    frame = inspect.currentframe()
    for _ in range(12):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, flower_module.Flower):
            return candidate
        frame = frame.f_back
    return None


def _in_flower_command() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.command.name == "flower"


def _refuse(problems: Iterable[str]) -> None:
    click.echo("Error: hms-tasks refuses to start Flower:", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    # SystemExit, not an exception: Celery's signal dispatch would log an exception with a
    # traceback before re-raising it.
    raise SystemExit(2)


def _on_import_modules(sender: Any = None, **_: Any) -> None:
    """Celery ``import_modules`` receiver: guard Flower as it builds its application."""
    flower_app = _flower_being_built()
    if flower_app is None:
        if _in_flower_command():
            _refuse(["hms-tasks could not attach its Flower guards (an unsupported Flower"
                     " version?): Flower would run without them"])
        return
    problems = start_problems(flower_app.options)
    try:
        control = get().flower_control
    except ConfigurationError as exc:
        problems.append(str(exc))
        control = False
    if problems:
        _refuse(problems)
    install(flower_app, control=control)


def connect(celery_app: Any) -> None:
    """Guard every Flower started against ``celery_app`` (``celery -A hms_tasks flower``)."""
    from celery.signals import import_modules

    import_modules.connect(_on_import_modules, sender=celery_app, weak=False,
                           dispatch_uid="hms_tasks.flower")
